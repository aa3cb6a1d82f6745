"""SQLAlchemy engines tuned for caviar's two backends."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_S = 30


def is_sqlite(url: str) -> bool:
    """True when ``url`` names an SQLite database."""
    return make_url(url).get_backend_name() == "sqlite"


def display_url(url: str) -> str:
    """``url`` with its password masked (``***``), for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def engine_kwargs(url: str, *, pool_size: int = 4, max_overflow: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``create_engine`` (shared with Optuna's own engine).

    SQLite waits on a locked database instead of failing at once. PostgreSQL gets a bounded,
    pre-pinged, recycled pool so a restarted server costs one retry, not a crash.
    """
    if is_sqlite(url):
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}}
    return {
        "pool_size": pool_size,
        "max_overflow": pool_size if max_overflow is None else max_overflow,
        "pool_timeout": 30,
        "pool_pre_ping": True,
        "pool_recycle": 1800,
    }


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str, *, pool_size: int = 4, max_overflow: int | None = None) -> Engine:
    """Create an engine: WAL, busy timeout and foreign keys on SQLite; a bounded pool on PostgreSQL.

    ``max_overflow``: connections beyond ``pool_size`` (default: as many again).
    """
    engine = create_engine(url, **engine_kwargs(url, pool_size=pool_size, max_overflow=max_overflow))
    if is_sqlite(url):
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)
