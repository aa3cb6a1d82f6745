"""Concurrency: exact global budgets under many threads and processes; sampling scales."""

from __future__ import annotations

import math
import multiprocessing
import threading
import time
from typing import Any

import numpy as np
import pytest
from scipy import stats

from caviar.service import trials
from caviar.service.db import Database
from caviar.service.errors import Conflict
from caviar.service.studies.schemas import BudgetUpdate, StudyUpdate
from caviar.service.studies.service import create_study, definition_of, load_record, parse_definition
from caviar.service.studies.steering import stop_study, update_study
from caviar.service.trials.enqueue import enqueue
from caviar.service.trials.schemas import EnqueueItem
from tests.service.helpers import external_study


def _ask_until_exhausted(url: str, name: str, out: list[int], errors: list[BaseException]) -> None:
    db = Database(url, pool_size=2)
    try:
        while True:
            try:
                out.append(trials.ask(db, name, worker_id=threading.current_thread().name).number)
            except Conflict as exc:
                assert exc.code == "budget_exhausted"
                return
    except BaseException as exc:  # surfaced by the test
        errors.append(exc)
    finally:
        db.dispose()


def test_16_threads_never_overshoot_a_budget_of_25(db: Database, db_url: str) -> None:
    create_study(db, parse_definition(external_study("race", n_trials=25)))
    numbers: list[int] = []
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_ask_until_exhausted, args=(db_url, "race", numbers, errors), name=f"t{i}")
        for i in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert sorted(numbers) == list(range(25))
    listed = trials.list_trials(db, "race", limit=1000)
    assert listed.total == 25
    assert all(t.state == "running" for t in listed.items)


def _process_asks(url: str, name: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    numbers: list[int] = []
    errors: list[BaseException] = []
    _ask_until_exhausted(url, name, numbers, errors)
    queue.put((numbers, [repr(e) for e in errors]))


def test_4_processes_never_overshoot_the_budget(db: Database, db_url: str) -> None:
    create_study(db, parse_definition(external_study("procs", n_trials=20)))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    processes = [ctx.Process(target=_process_asks, args=(db_url, "procs", queue)) for _ in range(4)]
    for process in processes:
        process.start()
    results = [queue.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(30)
    assert all(not errors for _, errors in results), results
    numbers = sorted(n for found, _ in results for n in found)
    assert numbers == list(range(20))


def test_concurrent_tells_and_reaps_keep_counts_exact(db: Database) -> None:
    create_study(db, parse_definition(external_study("tells", n_trials=12, max_retries=0)))
    numbers = [trials.ask(db, "tells").number for _ in range(12)]
    errors: list[BaseException] = []

    def finish(number: int) -> None:
        try:
            trials.tell(db, "tells", number, "complete", values=[float(number)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(n,)) for n in numbers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    record_state = load_record(db, "tells").state
    assert record_state == "completed"


def test_sampling_scales_are_right(db: Database) -> None:
    """Random sampler: log10(lr), log(1 - beta1) and dropout are uniform (KS test)."""
    create_study(db, parse_definition(external_study("scales", n_trials=400)))
    samples = []
    for _ in range(200):
        assignment = trials.ask(db, "scales")
        trials.tell(db, "scales", assignment.number, "complete", values=[0.0])
        samples.append(assignment.params)
    lr = np.log10([s["lr"] for s in samples])
    beta = np.log([1 - s["beta1"] for s in samples])
    dropout = np.array([s["dropout"] for s in samples])
    assert stats.kstest(lr, stats.uniform(loc=-4, scale=3).cdf).pvalue > 0.01
    low, high = math.log(1 - 0.999), math.log(1 - 0.8)
    assert stats.kstest(beta, stats.uniform(loc=low, scale=high - low).cdf).pvalue > 0.01
    assert stats.kstest(dropout, stats.uniform(loc=0, scale=0.6).cdf).pvalue > 0.01
    # and not uniform on the linear scale: most learning rates are far below the midpoint
    assert np.mean(10**lr < 0.05) > 0.8


def test_seeded_sequential_runs_repeat_and_differ_between_trials(db: Database) -> None:
    for name in ("seed-a", "seed-b"):
        create_study(db, parse_definition(external_study(name, n_trials=5)))
    a = [trials.ask(db, "seed-a").params for _ in range(5)]
    b = [trials.ask(db, "seed-b").params for _ in range(5)]
    assert a == b
    assert len({p["lr"] for p in a}) == 5


def test_concurrent_asks_with_one_request_id_get_one_trial(db: Database, db_url: str) -> None:
    create_study(db, parse_definition(external_study("req", n_trials=10)))
    numbers: list[int] = []
    errors: list[BaseException] = []

    def ask_once() -> None:
        other = Database(db_url, pool_size=1)
        try:
            while True:
                try:
                    numbers.append(trials.ask(other, "req", request_id="same").number)
                    return
                except Conflict as exc:  # the first ask still samples: retry, as clients do
                    assert exc.code == "ask_in_progress"
                    time.sleep(0.01)
        except BaseException as exc:
            errors.append(exc)
        finally:
            other.dispose()

    threads = [threading.Thread(target=ask_once) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and numbers == [0] * 6
    assert trials.list_trials(db, "req").total == 1


def test_a_request_retried_while_its_trial_is_sampled_waits_for_the_parameters(
    db: Database, db_url: str, monkeypatch
) -> None:
    """A client whose ask timed out during a slow sampler retries with the same request_id: the
    replay waits for the parameters, and past REPLAY_WAIT_S is told to retry (409 ask_in_progress,
    with Retry-After); it is never handed a bare trial."""
    from caviar.service.trials import lifecycle

    create_study(db, parse_definition(external_study("slow", n_trials=10)))
    sampling, release = threading.Event(), threading.Event()
    real_sample = lifecycle._sample

    def slow_sample(trial, definition):  # type: ignore[no-untyped-def]
        sampling.set()
        release.wait(30)
        real_sample(trial, definition)

    monkeypatch.setattr(lifecycle, "_sample", slow_sample)
    monkeypatch.setattr(lifecycle, "REPLAY_WAIT_S", 0.3)
    first: list[Any] = []
    thread = threading.Thread(target=lambda: first.append(trials.ask(db, "slow", request_id="r1")))
    thread.start()
    assert sampling.wait(30)
    other = Database(db_url, pool_size=1)
    try:
        with pytest.raises(Conflict) as raised:
            trials.ask(other, "slow", request_id="r1")
        assert raised.value.code == "ask_in_progress" and raised.value.retry_after_s == 1
        release.set()
        thread.join(30)
        again = trials.ask(other, "slow", request_id="r1")
    finally:
        other.dispose()
    assert again.number == first[0].number and again.params == first[0].params
    assert set(again.params) == {"lr", "beta1", "dropout"}


def test_lowering_the_budget_while_16_threads_ask_never_overshoots(db: Database, db_url: str) -> None:
    """PATCH takes the ask's study lock: the budget lowered mid-race is exact, never overshot."""
    create_study(db, parse_definition(external_study("lower", n_trials=2000)))
    numbers: list[int] = []
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_ask_until_exhausted, args=(db_url, "lower", numbers, errors), name=f"t{i}")
        for i in range(16)
    ]
    for thread in threads:
        thread.start()
    while len(numbers) < 10 and not errors:
        time.sleep(0.01)
    lowered = None
    while lowered is None:  # the asks go on meanwhile: aim a few trials above what is used now
        target = len(numbers) + 8
        try:
            lowered = update_study(db, "lower", StudyUpdate(budget=BudgetUpdate(n_trials=target)))
        except Conflict as exc:
            assert exc.code == "budget_below_used"
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    budget = definition_of(lowered).budget.n_trials
    assert budget < 2000
    assert sorted(numbers) == list(range(budget))
    assert trials.list_trials(db, "lower", limit=1000).total == budget


def test_enqueue_and_ask_concurrently_hand_out_each_set_once(db: Database, db_url: str) -> None:
    create_study(db, parse_definition(external_study("enq", n_trials=60)))
    handed: list[dict[str, float]] = []
    accepted: list[float] = []
    errors: list[BaseException] = []
    enqueuers_done = threading.Event()

    def enqueuer(index: int) -> None:
        other = Database(db_url, pool_size=1)
        try:
            for k in range(8):
                dropout = 0.1 + index * 0.01 + k * 0.001  # a marker no sampler draws
                item = EnqueueItem(params={"lr": 0.01, "beta1": 0.9, "dropout": dropout})
                try:
                    enqueue(other, "enq", [item])
                    accepted.append(dropout)
                except Conflict as exc:
                    assert exc.code == "budget_exhausted"
        except BaseException as exc:
            errors.append(exc)
        finally:
            other.dispose()

    def asker() -> None:
        other = Database(db_url, pool_size=1)
        try:
            while True:
                try:
                    handed.append(trials.ask(other, "enq").params)
                except Conflict as exc:
                    assert exc.code == "budget_exhausted"
                    if enqueuers_done.is_set():
                        return
                    time.sleep(0.02)
        except BaseException as exc:
            errors.append(exc)
        finally:
            other.dispose()

    enqueuers = [threading.Thread(target=enqueuer, args=(i,)) for i in range(4)]
    askers = [threading.Thread(target=asker) for _ in range(8)]
    for thread in [*enqueuers, *askers]:
        thread.start()
    for thread in enqueuers:
        thread.join(120)
    enqueuers_done.set()
    for thread in askers:
        thread.join(120)
    assert not errors, errors
    assert accepted, "no set was enqueued before the budget filled"
    dropouts = [p["dropout"] for p in handed]
    for dropout in accepted:
        assert dropouts.count(dropout) == 1, dropout
    assert len(handed) == 60
    assert trials.list_trials(db, "enq", state="waiting").total == 0


def test_a_stop_racing_the_last_tells_ends_stopped(db: Database, db_url: str) -> None:
    create_study(db, parse_definition(external_study("race-stop", n_trials=40)))
    numbers = [trials.ask(db, "race-stop").number for _ in range(12)]
    errors: list[BaseException] = []

    def finish(number: int) -> None:
        other = Database(db_url, pool_size=1)
        try:
            trials.tell(other, "race-stop", number, "complete", values=[float(number)])
        except BaseException as exc:
            errors.append(exc)
        finally:
            other.dispose()

    threads = [threading.Thread(target=finish, args=(n,)) for n in numbers]
    for thread in threads[:6]:
        thread.start()
    stop_study(db, "race-stop")
    for thread in threads[6:]:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    record = load_record(db, "race-stop")
    assert record.state == "stopped"
    assert trials.list_trials(db, "race-stop", state="running").total == 0
