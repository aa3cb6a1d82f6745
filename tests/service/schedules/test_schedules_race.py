"""Several replicas firing the same schedules at once: exactly one study per tick.

Threads with their own :class:`Database` objects, separate processes, and two app instances
running their scheduler loops, on one database. Runs on SQLite and PostgreSQL; the compare-and-
set must hold on both.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from caviar.service.api import create_app
from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.schedules import service
from caviar.storage import Schedule, ScheduleRun, StudyRecord
from tests.conftest import IS_POSTGRES
from tests.service.schedules.test_schedules import make, utc

START = utc(2024, 5, 1, 11, 59, 30)
TICKS = [utc(2024, 5, 1, 12, minute, 1) for minute in range(6)]  # a clock read just after each tick
SCHEDULES = ("alpha", "beta", "gamma")


def _create_schedules(db: Database) -> None:
    for name in SCHEDULES:
        make(db, START, name=name, cron="* * * * *")


def _assert_exactly_once(db: Database, n_ticks: int) -> None:
    with db.session() as session:
        names = list(session.scalars(select(StudyRecord.name)))
        runs = session.execute(
            select(ScheduleRun.schedule_id, ScheduleRun.tick_at, ScheduleRun.outcome)
        ).all()
        counts = dict(session.execute(select(Schedule.name, Schedule.run_count)).all())
    expected = sorted(f"{s}-20240501T12{m:02d}" for s in SCHEDULES for m in range(n_ticks))
    assert sorted(names) == expected  # one study per schedule and tick, none twice (names are unique)
    assert len(runs) == len(expected)
    assert Counter(outcome for _, _, outcome in runs) == {"created": len(expected)}
    assert counts == dict.fromkeys(SCHEDULES, n_ticks)


def _race(
    replicas: list[Database], clocks: list[list[datetime]], step: Callable[[int, datetime], object]
) -> None:
    """Run ``step(index, clocks[k][index])`` on a thread per replica, all together for each k."""
    barrier = threading.Barrier(len(replicas))
    errors: list[BaseException] = []

    def replica(index: int) -> None:
        try:
            for moments in clocks:
                barrier.wait(timeout=60)
                step(index, moments[index])
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(len(replicas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    for replica_db in replicas:
        replica_db.dispose()
    assert not errors, errors


def test_threads_with_their_own_databases_fire_each_tick_once(db_url: str, db: Database) -> None:
    _create_schedules(db)
    replicas = [Database(db_url) for _ in range(4)]
    created: list[int] = [0] * len(replicas)

    def step(index: int, now: datetime) -> None:
        created[index] += sum(r.outcome == "created" for r in service.fire_due(replicas[index], now))

    _race(replicas, [[now] * len(replicas) for now in TICKS], step)
    assert sum(created) == len(SCHEDULES) * len(TICKS)
    _assert_exactly_once(db, len(TICKS))


def _process_replica(url: str, ticks: list[datetime], barrier: Any, results: Any) -> None:
    """One replica in its own process: fire at each tick together with the others."""
    import optuna

    from caviar.service.db import Database
    from caviar.service.schedules import service

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = Database(url)
    created = 0
    try:
        for now in ticks:
            barrier.wait(timeout=120)
            created += sum(r.outcome == "created" for r in service.fire_due(db, now))
    finally:
        db.dispose()
    results.put(created)


def test_processes_fire_each_tick_once(db_url: str, db: Database) -> None:
    _create_schedules(db)
    context = multiprocessing.get_context("spawn")
    n = 3
    barrier = context.Barrier(n)
    results = context.Queue()
    processes = [
        context.Process(target=_process_replica, args=(db_url, TICKS[:4], barrier, results)) for _ in range(n)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(180)
    assert [p.exitcode for p in processes] == [0] * n
    assert sum(results.get(timeout=5) for _ in range(n)) == len(SCHEDULES) * 4
    _assert_exactly_once(db, 4)


def test_two_app_instances_fire_each_tick_once(
    db_url: str, db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two apps (two Database objects) with their scheduler loops racing on a shared fake clock."""
    _create_schedules(db)
    now = [START]
    monkeypatch.setattr(service, "clock", lambda: now[0])
    fast = settings.model_copy(update={"scheduler_interval_s": 0.01})
    replicas = [Database(db_url), Database(db_url)]
    try:
        with TestClient(create_app(fast, db=replicas[0])), TestClient(create_app(fast, db=replicas[1])):
            for index, tick in enumerate(TICKS):
                now[0] = tick
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    with db.session() as session:
                        fired = session.scalar(select(Schedule.run_count).where(Schedule.name == "gamma"))
                    if fired == index + 1:
                        break
                    time.sleep(0.01)
                time.sleep(0.1)  # let both loops take several more turns at this tick
    finally:
        for replica_db in replicas:
            replica_db.dispose()
    _assert_exactly_once(db, len(TICKS))


@pytest.mark.skipif(not IS_POSTGRES, reason="PostgreSQL: row locks on a real server with many connections")
def test_many_replicas_on_postgres_with_a_late_clock(db_url: str, db: Database) -> None:
    """Eight replicas, each reading its clock a little differently, over twelve ticks."""
    _create_schedules(db)
    replicas = [Database(db_url, pool_size=2) for _ in range(8)]
    clocks = [[utc(2024, 5, 1, 12, minute) + timedelta(seconds=i) for i in range(8)] for minute in range(12)]
    _race(replicas, clocks, lambda index, now: service.fire_due(replicas[index], now))
    _assert_exactly_once(db, 12)


def test_a_replica_with_a_stale_view_loses_the_compare_and_set(
    db: Database, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The loser of a race is turned away by the CAS itself, not by the unique backstop."""
    _create_schedules(db)
    with db.session() as session:
        stale = session.scalar(select(Schedule).where(Schedule.name == "alpha"))
    assert stale is not None
    other = Database(db_url)
    try:
        assert len(service.fire_due(other, TICKS[0])) == len(SCHEDULES)
    finally:
        other.dispose()
    with caplog.at_level("WARNING", logger="caviar.scheduler"):
        assert service._fire_one(db, stale, TICKS[0], service.DEFAULT_GRACE) == []
    assert "already recorded" not in caplog.text
    _assert_exactly_once(db, 1)
