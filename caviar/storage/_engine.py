"""SQLAlchemy engines tuned for caviar's two backends."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
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


class RenewalGate:
    """On SQLite, lease renewals of this process go before its other writes.

    SQLite has one writer and its busy handler is not fair: a renewal that polls for the writer
    lock while an import commits trial after trial can wait seconds. So a renewal announces itself
    (:meth:`renewal`) and every other transaction of this process on the same database waits,
    before it begins, until no renewal is pending (:meth:`yield_to_renewals`, at most
    ``max_wait_s``). Renewals take milliseconds; the transaction that holds the lock when one
    arrives finishes first (no deadlock). PostgreSQL locks rows, not the database: no gate there.
    """

    def __init__(self, max_wait_s: float = 1.0) -> None:
        self.max_wait_s = max_wait_s
        self._pending = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def renewal(self) -> Iterator[None]:
        """Hold the gate open for one renewal's transaction."""
        with self._changed:
            self._pending += 1
        try:
            yield
        finally:
            with self._changed:
                self._pending -= 1
                if not self._pending:
                    self._changed.notify_all()

    def yield_to_renewals(self, *_: object) -> None:
        """Wait (at most ``max_wait_s``) until no renewal of this process is pending."""
        if not self._pending:
            return
        with self._changed:
            self._changed.wait_for(lambda: not self._pending, self.max_wait_s)


_gates: dict[str, RenewalGate] = {}
_gates_guard = threading.Lock()


def renewal_gate(url: str) -> RenewalGate:
    """This process's :class:`RenewalGate` of the database at ``url``."""
    key = make_url(url).render_as_string(hide_password=False)
    with _gates_guard:
        gate = _gates.get(key)
        if gate is None:
            gate = _gates[key] = RenewalGate()
        return gate


def yield_to_renewals(engine: Engine, url: str) -> None:
    """On SQLite, make every transaction of ``engine`` begin after pending lease renewals."""
    if is_sqlite(url):
        event.listen(engine, "begin", renewal_gate(url).yield_to_renewals)


def make_engine(
    url: str, *, pool_size: int = 4, max_overflow: int | None = None, for_renewals: bool = False
) -> Engine:
    """Create an engine: WAL, busy timeout and foreign keys on SQLite; a bounded pool on PostgreSQL.

    ``max_overflow``: connections beyond ``pool_size`` (default: as many again). On SQLite an
    engine's transactions let this process's lease renewals go first (:class:`RenewalGate`),
    except those of the engine ``for_renewals``.
    """
    engine = create_engine(url, **engine_kwargs(url, pool_size=pool_size, max_overflow=max_overflow))
    if is_sqlite(url):
        event.listen(engine, "connect", _sqlite_pragmas)
        if not for_renewals:
            yield_to_renewals(engine, url)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)
