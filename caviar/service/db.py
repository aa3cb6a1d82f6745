"""The database handle shared by the REST API, the workers and the CLI."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from optuna.storages import BaseStorage
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from caviar.storage import get_optuna_storage, is_sqlite, make_engine, make_sessionmaker, renewal_gate

_PG_LOCK_CLASS = 0x63617669  # "cavi": first key of caviar's advisory locks

# Process-wide: every Database object on the same URL shares these (POSIX record locks belong
# to the process, so two handles in one process must queue on the thread lock first).
_registry_guard = threading.Lock()
_thread_locks: dict[tuple[str, int], threading.Lock] = {}
_lock_files: dict[str, int] = {}
_held = threading.local()  # the study locks this thread holds: a nested study_lock is a no-op


class Database:
    """caviar's engine and session factory plus Optuna's storage, on one URL.

    Args:
        url: SQLAlchemy URL (``sqlite:///./caviar.db`` or ``postgresql+psycopg://...``).
        pool_size: connections caviar's own engine keeps (Optuna's storage keeps its own two).
        lease_pool_size: connections of :attr:`lease_engine`, kept for lease renewals only.
    """

    def __init__(self, url: str, *, pool_size: int = 4, lease_pool_size: int = 2) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size=pool_size)
        self.sessions = make_sessionmaker(self.engine)
        self.is_sqlite = is_sqlite(url)
        self.lease_pool_size = lease_pool_size
        self._lease_engine: Engine | None = None
        self._lease_engine_guard = threading.Lock()

    @property
    def lease_engine(self) -> Engine:
        """A second engine on the same URL for lease renewals only (created on first use).

        Renewals (heartbeats, the renewal of a report) take their connection here, so asks, imports
        and samplers that hold every connection of :attr:`engine` and of Optuna's storage never make
        a lease wait. Code on this engine runs plain Core statements in short transactions that
        start with their write (SQLite: the writer lock is waited for with the busy timeout, never
        held across a call into the other engine, so the two cannot deadlock).
        """
        if self._lease_engine is None:
            with self._lease_engine_guard:
                if self._lease_engine is None:
                    self._lease_engine = make_engine(
                        self.url, pool_size=self.lease_pool_size, max_overflow=0, for_renewals=True
                    )
        return self._lease_engine

    @contextlib.contextmanager
    def renewing(self) -> Iterator[Connection]:
        """One transaction on :attr:`lease_engine` (SQLite: this process's other writes wait for it)."""
        with renewal_gate(self.url).renewal(), self.lease_engine.begin() as connection:
            yield connection

    @property
    def optuna(self) -> BaseStorage:
        """Optuna's (cached) RDB storage on the same database."""
        return get_optuna_storage(self.url)

    def session(self) -> Session:
        """A new ORM session (use as a context manager)."""
        return self.sessions()

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
        if self._lease_engine is not None:
            self._lease_engine.dispose()

    @contextlib.contextmanager
    def study_lock(self, study_id: int) -> Iterator[None]:
        """Serialise budget-sensitive work on one study across threads and processes.

        Threads of this process queue on an in-process lock *before* any connection is taken
        (a lock held on a pooled connection while Optuna opens its own sessions drains pools).
        Across processes: a PostgreSQL advisory lock, or a byte-range lock on a file beside the
        SQLite database. Re-entrant within a thread: a function that needs the lock may be called by
        one that holds it already.
        """
        key = (self.url, study_id)
        held: set[tuple[str, int]] = _held.__dict__.setdefault("keys", set())
        if key in held:
            yield
            return
        with _registry_guard:
            thread_lock = _thread_locks.setdefault(key, threading.Lock())
        with thread_lock:
            held.add(key)
            try:
                with self._process_lock(study_id):
                    yield
            finally:
                held.discard(key)

    @contextlib.contextmanager
    def _process_lock(self, study_id: int) -> Iterator[None]:
        """The cross-process half of :meth:`study_lock` (the caller holds the thread lock)."""
        if self.is_sqlite:
            fd = self._sqlite_lock_fd()
            if fd is None:
                yield
                return
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, study_id)
            try:
                yield
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, study_id)
        else:
            # A transaction-level lock: it ends with the transaction (the rollback below, or the
            # connection closing), so releasing it sends no statement of its own.
            with self.engine.connect() as connection:
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:c, :o)"), {"c": _PG_LOCK_CLASS, "o": study_id}
                )
                try:
                    yield
                finally:
                    connection.rollback()

    def _sqlite_lock_fd(self) -> int | None:
        database = make_url(self.url).database
        if not database or database == ":memory:":
            return None
        path = str(Path(database).resolve()) + ".lock"
        with _registry_guard:
            fd = _lock_files.get(path)
            if fd is None:
                fd = _lock_files[path] = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            return fd
