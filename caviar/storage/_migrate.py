"""Schema creation and migration, run once before servers and workers start.

Two processes creating Optuna's schema on a fresh PostgreSQL database race (one dies on a
UniqueViolation of the ``studydirection`` type), so :func:`upgrade` holds a database-wide
advisory lock on PostgreSQL, or a file lock beside the SQLite file, for the whole step.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path

import optuna
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from caviar.storage._engine import is_sqlite, make_engine
from caviar.storage._models import VERSION_TABLE

_log = logging.getLogger(__name__)
_MIGRATIONS = Path(__file__).parent / "migrations"
_PG_LOCK_KEY = 0x63617669  # "cavi"


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = connection
    return config


@contextlib.contextmanager
def _schema_lock(engine: Engine) -> Iterator[Connection]:
    url = engine.url
    with engine.connect() as connection:
        if is_sqlite(str(url)) and url.database and url.database != ":memory:":
            lock_path = Path(url.database).with_suffix(Path(url.database).suffix + ".migrate.lock")
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            with open(lock_path, "w") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield connection
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        elif connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            connection.commit()
            try:
                yield connection
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                connection.commit()
        else:
            yield connection


def head_revision() -> str:
    """The newest migration of caviar's tables."""
    script = ScriptDirectory(str(_MIGRATIONS))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at, or None before the first upgrade."""
    with engine.connect() as connection:
        return _revision(connection)


def _revision(connection: Connection) -> str | None:
    return MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE}
    ).get_current_revision()


class DatabaseNotReady(Exception):
    """The database cannot be used yet; the message says why (without credentials)."""


def check_ready(url: str, *, migrated: bool, connect_timeout_s: int = 5) -> None:
    """Connect once (no pool) and check that the database can be served.

    Args:
        url: the database.
        migrated: also require caviar's schema (someone else migrates: ``caviar serve
            --no-migrate``); an SQLite file must then exist already (it is not created).
        connect_timeout_s: how long one PostgreSQL connection attempt may take.

    Raises:
        DatabaseNotReady: the server does not answer, the database does not exist (yet), or it
            has no caviar schema while ``migrated`` is asked for.
    """
    kwargs: dict[str, object] = {"poolclass": NullPool}
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            if migrated and not Path(database).is_file():
                raise DatabaseNotReady(f"no SQLite database file at {database}")
            if not migrated:
                Path(database).parent.mkdir(parents=True, exist_ok=True)  # as the upgrade would
    else:
        kwargs["connect_args"] = {"connect_timeout": connect_timeout_s}
    engine = create_engine(url, **kwargs)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
            revision = _revision(connection) if migrated else None
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise DatabaseNotReady(detail[0] if detail else type(exc).__name__) from None
    finally:
        engine.dispose()
    if migrated and revision is None:
        raise DatabaseNotReady("the database has no caviar schema yet (run `caviar db upgrade`)")


def is_up_to_date(url: str) -> bool:
    """True when both Optuna's schema and caviar's tables are at head."""
    engine = make_engine(url)
    try:
        if "studies" not in inspect(engine).get_table_names():
            return False
        return current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def upgrade(url: str) -> str:
    """Create Optuna's schema and migrate caviar's tables to head; safe to run concurrently.

    Returns:
        The revision the database is at afterwards.
    """
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url, pool_size=1)
    try:
        with _schema_lock(engine) as connection:
            # Optuna creates (or checks) its own tables and its own alembic_version table.
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": NullPool})
            storage.engine.dispose()
            command.upgrade(_alembic_config(connection), "head")
            connection.commit()
        revision = current_revision(engine)
        _log.info("database at revision %s", revision)
        return revision or ""
    finally:
        engine.dispose()
