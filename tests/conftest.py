"""Shared fixtures: a fresh, migrated database per test on the backend under test.

The backend comes from ``CAVIAR_TEST_DATABASE``: ``sqlite`` (default) or an admin URL of a
PostgreSQL server (``postgresql+psycopg://postgres@127.0.0.1:5432/test``), on which the suite
creates and drops its own databases. A migrated template is built once per session and copied
for each test (a file copy on SQLite, ``CREATE DATABASE ... TEMPLATE`` on PostgreSQL).
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from caviar import storage

BACKEND_URL = os.environ.get("CAVIAR_TEST_DATABASE", "sqlite")
IS_POSTGRES = BACKEND_URL.startswith("postgresql")
# `make test-long` sets CAVIAR_TEST_LONG=1: the examples run on their full budgets (CI: smaller ones
# that check the same properties).
LONG_RUN = os.environ.get("CAVIAR_TEST_LONG", "") == "1"

# The CLI prints through rich, which wraps at the terminal's width: CI has none (80 columns),
# so a long temporary path would split the words a test looks for.
os.environ["COLUMNS"] = "300"
# One OpenMP thread in every process the tests start that does not set its own (the docs' code
# blocks, say): the suite runs two test processes on two cores, more threads only contend.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _pg_url(name: str) -> str:
    return make_url(BACKEND_URL).set(database=name).render_as_string(hide_password=False)


class DatabaseFactory:
    """Creates fresh databases for tests: migrated copies of a template, or empty ones."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.created: list[str] = []
        self.template: str | None = None
        self._admin = None
        # A test's database is dropped on this thread as soon as the test ends, while the next tests
        # run (they mostly wait on servers and workers): dropping them all at the end of the
        # session cost 17-25 s of one test's teardown per pytest process on PostgreSQL.
        self._to_drop: queue.Queue[str | None] = queue.Queue()
        self._dropper: threading.Thread | None = None

    def _create_pg(self, template: str | None = None, name: str | None = None) -> str:
        name = name or f"caviar_t_{uuid.uuid4().hex[:12]}"
        clause = f' TEMPLATE "{make_url(template).database}"' if template else ""
        with self.admin().connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"{clause}'))
            # Commits need not wait for the disk (a test database outlives no crash of the server;
            # a restart is a clean shutdown, which writes them): 0.1 ms a commit instead of 0.3-0.7.
            conn.execute(text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
        if name not in self.created:
            self.created.append(name)
        return _pg_url(name)

    def admin(self):  # type: ignore[no-untyped-def]
        """One autocommit engine on the server's admin URL for the whole session.

        It pools nothing: a test restarts the server, and a pooled connection would not survive.
        """
        if self._admin is None:
            self._admin = create_engine(BACKEND_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        return self._admin

    def empty(self) -> str:
        """A URL of a brand-new empty database."""
        if IS_POSTGRES:
            return self._create_pg()
        return f"sqlite:///{self.root / (uuid.uuid4().hex[:12] + '.db')}"

    def migrated(self) -> str:
        """A URL of a fresh database at head (Optuna's schema and caviar's tables)."""
        url = self.later()
        self.create_migrated(url)
        return url

    def later(self) -> str:
        """A URL of a database that does not exist yet (an SQLite file in a folder not made yet)."""
        if IS_POSTGRES:
            name = f"caviar_t_{uuid.uuid4().hex[:12]}"
            self.created.append(name)  # dropped when released, or at the end of the session
            return _pg_url(name)
        return f"sqlite:///{self.root / uuid.uuid4().hex[:12] / 'caviar.db'}"

    def create_migrated(self, url: str) -> None:
        """Create the database of a :meth:`later` URL, at head (appearing whole, never half-copied)."""
        if self.template is None:
            self.template = self.empty()
            storage.upgrade(self.template)
        if IS_POSTGRES:
            self._create_pg(template=self.template, name=make_url(url).database)
            return
        target = Path(str(make_url(url).database))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(str(make_url(self.template).database), partial)
        partial.rename(target)

    def release(self, url: str) -> None:
        """Drop a test's database in the background (PostgreSQL; SQLite files go with tmp_path)."""
        if not IS_POSTGRES:
            return
        name = str(make_url(url).database)
        if name in self.created:
            self.created.remove(name)
        if self._dropper is None:
            self._dropper = threading.Thread(target=self._drop_queued, name="drop-databases", daemon=True)
            self._dropper.start()
        self._to_drop.put(name)

    def _drop_queued(self) -> None:
        while (name := self._to_drop.get()) is not None:
            try:
                self._drop(name)
            except Exception:  # the server restarting (a serial test): tried again at the end
                self.created.append(name)

    def _drop(self, name: str) -> None:
        with self.admin().connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def drop_all(self) -> None:
        if not IS_POSTGRES:
            return
        if self._dropper is not None:
            self._to_drop.put(None)
            self._dropper.join()
        for name in self.created:
            self._drop(name)
        self.admin().dispose()


@pytest.fixture(scope="session")
def databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(tmp_path_factory.mktemp("db"))
    yield factory
    storage.reset_optuna_storages()
    factory.drop_all()


@pytest.fixture
def db_url(databases: DatabaseFactory) -> Iterator[str]:
    """A fresh migrated database for this test."""
    url = databases.migrated()
    yield url
    storage.reset_optuna_storages()
    databases.release(url)


@pytest.fixture
def db(db_url: str):  # type: ignore[no-untyped-def]
    from caviar.service.db import Database

    database = Database(db_url)
    yield database
    database.dispose()


@pytest.fixture
def settings(db_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    from caviar.service.config import Settings

    return Settings(
        database_url=db_url, heartbeat_interval_s=30, artifact_dir=str(tmp_path / "artifacts"), api_token=None
    )


@pytest.fixture
def client(settings, db):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from caviar.service.api import create_app

    with TestClient(create_app(settings, db=db)) as test_client:
        yield test_client


# The test files that take longest (measured with --durations), longest first. Under pytest-xdist
# (`make test`: -n 2 --dist loadfile, a file stays on one process) they are handed out first, so
# the short files fill the gaps at the end instead of a long file starting last and running alone.
# Every other file follows in collection order. A file missing here still runs; add one when it
# grows past about a minute (split it first if it is much longer: one file cannot be shared).
LONGEST_FIRST = (
    "tests/trainer/test_train.py",
    "tests/worker/test_worker.py",
    "tests/worker/test_worker_faults.py",
    "tests/worker/test_optuna_programs.py",
    "tests/test_docs.py",
    "tests/worker/test_fused_diversity.py",
    "tests/examples/test_examples.py",
    "tests/examples/test_examples_scripts.py",
    "tests/trainer/test_gradcheck_cli.py",
    "tests/worker/test_trial_dirs.py",
    "tests/service/trials/test_trials_survivors.py",
    "tests/worker/test_programs.py",
    "tests/service/trials/test_trials_api.py",
    "tests/worker/test_code_security.py",
    "tests/test_client.py",
    "tests/service/test_server.py",
    "tests/service/trials/test_trials_concurrency.py",
    "tests/service/test_hardening.py",
    "tests/service/test_fuzz_stateful.py",
    "tests/worker/test_child_processes.py",
    "tests/service/test_fuzz.py",
    "tests/service/test_fuzz_scopes.py",
    "tests/worker/test_pbt_worker.py",
    "tests/service/trials/test_lease_isolation.py",
    "tests/worker/test_worker_slot.py",
    "tests/benchmarks/test_sql_statements.py",
    "tests/service/test_access_log.py",
)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The pass of ``make test`` that runs the tests marked ``serial`` (``-m serial``) imports only
    the test files that name the marker: collecting the whole suite for them cost 7-12 s a pass."""
    name = collection_path.name
    if config.option.markexpr != "serial" or not (name.startswith("test_") and name.endswith(".py")):
        return None
    return "mark.serial" not in collection_path.read_text(encoding="utf-8")


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist would otherwise reorder the files by their number of tests (many short ones first)
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


# The end-to-end tests of the worker's handling of the user's code: what it reads from a program's
# output, the trial directories, the allow list and the child's environment, the child processes
# it ends, its one-line exits on a refused token. They start a service, but each route they call
# is tested on both databases: they run on SQLite only (ONE_DATABASE, USES_DATABASE below).
WORKER_SIDE = (
    "tests/worker/test_optuna_programs.py",
    "tests/worker/test_trial_dirs.py",
    "tests/worker/test_code_security.py",
    "tests/worker/test_child_processes.py",
    "tests/worker/test_worker_errors.py",
)

# Test files whose subject is not the service's database (the trainer's math, the worker's parts
# against stand-in APIs, packaging, layering, deployment files, the docs pages, the examples): on
# PostgreSQL they would run exactly the code they ran on SQLite, so the PostgreSQL half of `make
# test` leaves them out. None of them uses the test database (checked at collection), except the
# files of USES_DATABASE below.
ONE_DATABASE = (
    "tests/trainer/",
    "tests/test_docs.py",
    "tests/examples/",
    "tests/worker/test_fused_diversity.py",
    *WORKER_SIDE,
    "tests/test_layering.py",
    "tests/test_lock.py",
    "tests/test_compose.py",
    "tests/test_deploy.py",
    "tests/test_backoff.py",
    "tests/test_logging.py",
    "tests/test_mutants_map.py",
    "tests/benchmarks/test_fused_and_time_to_quality.py",
    "tests/benchmarks/test_pbt_vs_asha.py",
    "tests/service/definition/test_fused_python.py",
    "tests/service/schedules/test_schedules_cron.py",
    "tests/service/store/test_ranking.py",
    "tests/service/test_web_security_policy.py",
    "tests/cli/test_unreachable.py",
    "tests/worker/test_allow.py",
    "tests/worker/test_asha.py",
    "tests/worker/test_data_files.py",
    "tests/worker/test_metrics_reader.py",
    "tests/worker/test_run_fused.py",
    "tests/worker/test_slot.py",
    "tests/worker/test_supervisor.py",
    "tests/worker/test_threads.py",
    "tests/worker/test_trainer_runner.py",
    "tests/worker/test_worker_identity.py",
)
# Files of ONE_DATABASE that start a service on the test database although the database is not
# their subject; they run on SQLite, the database the README and the docs start a user on:
# - the docs pages' blocks and the examples (their subject is what a user copies; every route
#   and worker path they call is tested on both databases by the service and worker tests);
# - the search coverage of fused groups (what the sampler proposes does not depend on where the
#   trials are stored; the fused ask it goes through is tested on both in tests/worker/);
# - the worker's handling of the user's code (WORKER_SIDE above).
USES_DATABASE = (
    "tests/test_docs.py",
    "tests/examples/",
    "tests/worker/test_fused_diversity.py",
    *WORKER_SIDE,
)
# Single tests of files that run on both databases can be marked ``one_database`` for the same
# reason: the end-to-end worker tests whose subject is the worker's side (a program's output, its
# trial directory, its child processes, its environment, its allow list, a slot's own rules). The
# service calls they make are tested on both databases, and the worker tests whose subject is the
# service under real workers (reaping a killed worker's trial, workers racing for an exact budget,
# the API or the database restarted mid-trial, the main digits study) stay on both.


def _listed(path: str, entries: tuple[str, ...]) -> bool:
    """Whether ``path`` is one of ``entries`` or lies in one of its folders (``.../``)."""
    return any(path == entry or (entry.endswith("/") and path.startswith(entry)) for entry in entries)


def _runs_once(item: pytest.Item, path: str) -> bool:
    return _listed(path, ONE_DATABASE) or item.get_closest_marker("one_database") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On PostgreSQL, leave out the files of :data:`ONE_DATABASE` and the tests marked
    ``one_database``; under pytest-xdist, the files of :data:`LONGEST_FIRST` first, in its order (a
    stable sort)."""
    root = config.rootpath
    once = [item for item in items if _runs_once(item, item.path.relative_to(root).as_posix())]
    for item in once:
        path = item.path.relative_to(root).as_posix()
        allowed = item.get_closest_marker("one_database") is not None or _listed(path, USES_DATABASE)
        if not allowed and "databases" in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(f"{item.nodeid} uses the test database: take {path} out of ONE_DATABASE")
    if IS_POSTGRES and once:
        config.hook.pytest_deselected(items=once)
        left_out = set(once)
        items[:] = [item for item in items if item not in left_out]
    if not hasattr(config, "workerinput"):
        return
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}

    def key(item: pytest.Item) -> int:
        return rank.get(item.path.relative_to(root).as_posix(), len(rank))

    items.sort(key=key)


def pytest_report_header() -> str:
    return f"caviar test database backend: {'postgresql' if IS_POSTGRES else 'sqlite'}"
