"""Concurrency: exact global budgets under many threads and processes; sampling scales."""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from optuna.trial import TrialState
from scipy import stats
from sqlalchemy import text, update

from caviar.service import trials
from caviar.service.db import Database
from caviar.service.errors import Conflict
from caviar.service.store import (
    FAIL_REASON,
    TELL_GRACE_S,
    claim_end,
    create_study,
    definition_of,
    load_record,
    parse_definition,
    trial_id,
)
from caviar.service.studies.schemas import BudgetUpdate, StudyUpdate
from caviar.service.studies.service import describe
from caviar.service.studies.steering import stop_study, update_study
from caviar.service.trials import reap
from caviar.service.trials.enqueue import enqueue
from caviar.service.trials.schemas import EnqueueItem
from caviar.storage import TrialLease, utcnow
from tests.service.helpers import POLICY, external_study


def _ask_until_exhausted(url: str, name: str, out: list[int], errors: list[BaseException]) -> None:
    db = Database(url, pool_size=2)
    try:
        while True:
            try:
                out.append(
                    trials.ask(db, name, worker_id=threading.current_thread().name, policy=POLICY).number
                )
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


def test_concurrent_tells_and_reaps_keep_counts_exact(db: Database, db_url: str) -> None:
    """Tells of every kind and reapers run at once on trials whose leases all lapsed: each trial
    ends exactly one way (the tell or the reaper), each failure is retried exactly once, and the
    study then completes at exactly its budget."""
    create_study(
        db, parse_definition(external_study("tells", n_trials=12, max_retries=1, max_failed_trials=100))
    )
    numbers = [trials.ask(db, "tells", policy=POLICY).number for _ in range(12)]
    kinds = ["complete", "pruned", "fail"]
    told: dict[int, str] = {}
    errors: list[BaseException] = []
    later = utcnow() + timedelta(hours=1)  # every lease has lapsed by then
    start = threading.Barrier(12 + 3)

    def finish(number: int) -> None:
        other = Database(db_url, pool_size=1)
        try:
            start.wait(60)
            kind = kinds[number % 3]
            try:
                trials.tell(
                    other, "tells", number, kind, values=[float(number)] if kind == "complete" else None
                )
                told[number] = kind
            except Conflict as exc:
                assert exc.code in ("lease_lost", "trial_finished"), exc.code  # the reaper won
        except BaseException as exc:
            errors.append(exc)
        finally:
            other.dispose()

    def reaper() -> None:
        other = Database(db_url, pool_size=1)
        try:
            start.wait(60)
            for _ in range(3):
                reap(other, now=later)
        except BaseException as exc:
            errors.append(exc)
        finally:
            other.dispose()

    threads = [threading.Thread(target=finish, args=(n,)) for n in numbers]
    threads += [threading.Thread(target=reaper) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    listed = {t.number: t for t in trials.list_trials(db, "tells", limit=1000).items}
    for number in numbers:
        trial = listed[number]
        if told.get(number) in ("complete", "pruned"):
            assert trial.state == told[number]  # a tell that answered 200 stands
        else:
            assert trial.state == "fail"  # told fail, or reaped
    retries = {t.retry_of: t for t in listed.values() if t.retry_of is not None}
    assert len(retries) == sum(1 for t in listed.values() if t.retry_of is not None)  # one retry each
    assert sorted(retries) == sorted(n for n in numbers if listed[n].state == "fail")
    assert all(t.state == "waiting" and t.params == listed[n].params for n, t in retries.items())
    counts = trials_counts(db, "tells")
    assert counts["complete"] + counts["pruned"] + counts["waiting"] == 12  # the budget, exactly
    for _ in retries:  # the retries finish the study at exactly its budget
        assignment = trials.ask(db, "tells", policy=POLICY)
        assert assignment.retry_of is not None
        trials.tell(db, "tells", assignment.number, "complete", values=[0.0])
    with pytest.raises(Conflict):
        trials.ask(db, "tells", policy=POLICY)
    assert load_record(db, "tells").state == "completed"
    counts = trials_counts(db, "tells")
    assert counts["complete"] + counts["pruned"] == 12 and counts["running"] == counts["waiting"] == 0


def trials_counts(db: Database, name: str) -> dict[str, int]:
    """The study's trial counts as GET /studies/{name} shows them, checked against its trials."""
    shown = describe(db, load_record(db, name)).trial_counts.model_dump()
    listed = Counter[str](t.state for t in trials.list_trials(db, name, limit=1000).items)
    assert shown == {state: listed[state] for state in shown}, (shown, listed)
    return shown


def test_sampling_scales_are_right(db: Database) -> None:
    """Random sampler: log10(lr), log(1 - beta1) and dropout are uniform (KS test)."""
    create_study(db, parse_definition(external_study("scales", n_trials=400)))
    samples = []
    for _ in range(200):
        assignment = trials.ask(db, "scales", policy=POLICY)
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
    a = [trials.ask(db, "seed-a", policy=POLICY).params for _ in range(5)]
    b = [trials.ask(db, "seed-b", policy=POLICY).params for _ in range(5)]
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
                    numbers.append(trials.ask(other, "req", request_id="same", policy=POLICY).number)
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
    thread = threading.Thread(
        target=lambda: first.append(trials.ask(db, "slow", request_id="r1", policy=POLICY))
    )
    thread.start()
    assert sampling.wait(30)
    other = Database(db_url, pool_size=1)
    try:
        with pytest.raises(Conflict) as raised:
            trials.ask(other, "slow", request_id="r1", policy=POLICY)
        assert raised.value.code == "ask_in_progress" and raised.value.retry_after_s == 1
        release.set()
        thread.join(30)
        again = trials.ask(other, "slow", request_id="r1", policy=POLICY)
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
    while lowered is None:  # the asks go on meanwhile: aim above what is used now
        # (a margin the asks cannot outrun while the PATCH waits for the lock on a loaded machine)
        target = len(numbers) + 64
        assert target < 2000, "the PATCH never landed"
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
                    handed.append(trials.ask(other, "enq", policy=POLICY).params)
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
    numbers = [trials.ask(db, "race-stop", policy=POLICY).number for _ in range(12)]
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


# ---- forced interleavings ----------------------------------------------------------------------
#
# Each test below holds a first operation inside its locked section (a function it calls under
# ``Database.study_lock`` waits there) and starts a second one that would break the budget if it
# ran in that window. The first operation lets go once the second has either reached the same
# point (the lock failed: the dangerous interleaving happened, every run) or waits on the study
# lock (seen on its stack). So with the lock the tests pass, and without it they fail every time,
# not sometimes; no sleep decides anything.


def waits_on_study_lock(thread: threading.Thread) -> bool:
    """Whether ``thread`` is inside :meth:`Database.study_lock` (taking it: the holder is elsewhere)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name in ("study_lock", "_process_lock") and frame.f_code.co_filename.endswith(
            f"{os.sep}db.py"
        ):
            return True
        frame = frame.f_back
    return False


WAITED = "second waits on the study lock"


class Interleaving:
    """Runs ``first`` until it is inside the locked section, then ``second`` against it.

    Wrap the functions where each operation must meet the other with :meth:`point`: the thread
    running ``first`` waits at its point (once), the one running ``second`` marks its own.
    """

    HOLD_POLLS = 5  # the second thread must be seen waiting on the lock this many polls in a row

    def __init__(self) -> None:
        self.first_inside = threading.Event()
        self.second_reached: Any = threading.Event()  # or a multiprocessing Event
        self.second_thread: threading.Thread | None = None
        self.second_waits: Callable[[], bool] = lambda: False  # is it waiting on the study lock?
        self.second_alive: Callable[[], bool] = lambda: True
        self.results: dict[str, Any] = {}
        self.held_until: str | None = None

    def point(
        self, fn: Callable[..., Any], *, role: str | None = None, after: bool = False
    ) -> Callable[..., Any]:
        """``fn`` wrapped: the first operation waits in it (before ``fn`` runs, or ``after``), the
        second marks that it got there (before ``fn`` runs). ``role`` limits the wrapper to one."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = threading.current_thread().name
            if name == "first" and role in (None, "first") and not self.first_inside.is_set():
                result = fn(*args, **kwargs) if after else None
                self.first_inside.set()
                self._hold()
                return result if after else fn(*args, **kwargs)
            if name == "second" and role in (None, "second"):
                self.second_reached.set()
            return fn(*args, **kwargs)

        return wrapper

    def _hold(self) -> None:
        deadline = time.monotonic() + 60
        seen_waiting = 0
        while not self.second_reached.wait(0.02):
            seen_waiting = seen_waiting + 1 if self.second_waits() else 0
            if seen_waiting >= self.HOLD_POLLS:
                self.held_until = WAITED
                return
            if not self.second_alive() or time.monotonic() > deadline:
                self.held_until = "second ended without reaching its point"
                return
        self.held_until = "second reached its point inside the window"

    def run(self, first: Callable[[], Any], second: Callable[[], Any]) -> dict[str, Any]:
        """Run both; answers {"first": result or exception, "second": ...}."""

        def call(key: str, fn: Callable[[], Any]) -> None:
            try:
                self.results[key] = fn()
            except BaseException as exc:  # the test looks at it
                self.results[key] = exc

        one = threading.Thread(target=call, args=("first", first), name="first")
        one.start()
        assert self.first_inside.wait(60), f"the first operation never reached its point: {self.results}"
        self.second_thread = second_thread = threading.Thread(
            target=call, args=("second", second), name="second"
        )
        self.second_waits = lambda: waits_on_study_lock(second_thread)
        second_thread.start()  # returns once the thread runs: before that is_alive() is False
        self.second_alive = second_thread.is_alive
        one.join(120)
        second_thread.join(120)
        assert not one.is_alive() and not second_thread.is_alive()
        return self.results

    def run_against_process(self, first: Callable[[], Any], start_second: Callable[[Any], Any]) -> Any:
        """Run ``first`` in a thread and, once it is inside, ``start_second(reached_event)``: a
        started process with ``is_alive`` whose own code sets ``reached_event`` at its point.
        Answers the process; ``self.results["first"]`` holds the first operation's outcome."""

        def call() -> None:
            try:
                self.results["first"] = first()
            except BaseException as exc:  # the test looks at it
                self.results["first"] = exc

        one = threading.Thread(target=call, name="first")
        one.start()
        assert self.first_inside.wait(60), f"the first operation never reached its point: {self.results}"
        process = start_second(self.second_reached)
        self.second_alive = process.is_alive
        one.join(180)
        assert not one.is_alive()
        return process


def _other(db_url: str) -> Database:
    """A second handle on the database, as another server process would have."""
    return Database(db_url, pool_size=2)


def test_two_asks_for_the_last_trial_hand_out_one(db: Database, db_url: str, monkeypatch) -> None:
    """The first ask has counted the budget (one trial left) and holds the lock; the second counts it
    too: without the lock both would start a trial."""
    from caviar.service.trials import lifecycle

    create_study(db, parse_definition(external_study("last", n_trials=1)))
    race = Interleaving()
    monkeypatch.setattr(lifecycle, "record_with_counts", race.point(lifecycle.record_with_counts, after=True))
    other = _other(db_url)
    try:
        results = race.run(
            lambda: trials.ask(db, "last", policy=POLICY), lambda: trials.ask(other, "last", policy=POLICY)
        )
    finally:
        other.dispose()
    assert not isinstance(results["first"], BaseException), results
    assert race.held_until == WAITED, race.held_until
    assert isinstance(results["second"], Conflict) and results["second"].code == "budget_exhausted", (
        race.held_until,
        results,
    )
    assert trials.list_trials(db, "last").total == 1


@pytest.mark.parametrize("ending", ["fail_tell", "reap", "release"])
def test_a_retry_being_queued_is_not_outrun_by_an_ask(
    db: Database, db_url: str, monkeypatch, ending: str
) -> None:
    """A trial that failed (told, reaped, handed back) is out of the budget count until its retry is
    queued: an ask in that window would start a new trial and the retry would overshoot n_trials.
    The ask must wait for the retry and get it."""
    from caviar.service.trials import leases, lifecycle

    create_study(db, parse_definition(external_study("retry", n_trials=1, max_retries=1)))
    trial = trials.ask(db, "retry", policy=POLICY)
    race = Interleaving()
    module = lifecycle if ending == "fail_tell" else leases
    monkeypatch.setattr(module, "requeue_retry", race.point(module.requeue_retry, role="first"))
    monkeypatch.setattr(
        lifecycle, "record_with_counts", race.point(lifecycle.record_with_counts, role="second")
    )
    first: Callable[[], Any] = {
        "fail_tell": lambda: trials.tell(db, "retry", trial.number, "fail", reason="boom"),
        "reap": lambda: reap(db, now=utcnow() + timedelta(hours=1)),
        "release": lambda: trials.release(db, "retry", trial.number),
    }[ending]
    other = _other(db_url)
    try:
        results = race.run(first, lambda: trials.ask(other, "retry", policy=POLICY))
    finally:
        other.dispose()
    assert not isinstance(results["first"], BaseException), results
    assert race.held_until == WAITED, race.held_until
    second = results["second"]
    assert not isinstance(second, BaseException), (race.held_until, results)
    assert second.retry_of == trial.number and second.params == trial.params, (race.held_until, second)
    counts = trials_counts(db, "retry")
    assert counts == {"waiting": 0, "running": 1, "complete": 0, "pruned": 0, "fail": 1}, race.held_until


def test_lowering_the_budget_is_not_outrun_by_an_ask(db: Database, db_url: str, monkeypatch) -> None:
    """PATCH counts the used trials and then writes the lower budget: an ask between the two would
    start a trial the new budget has no room for."""
    from caviar.service.studies import steering
    from caviar.service.trials import lifecycle

    create_study(db, parse_definition(external_study("lower-one", n_trials=3)))
    trials.ask(db, "lower-one", policy=POLICY)
    race = Interleaving()
    monkeypatch.setattr(steering, "all_trials", race.point(steering.all_trials, role="first", after=True))
    monkeypatch.setattr(
        lifecycle, "record_with_counts", race.point(lifecycle.record_with_counts, role="second")
    )
    other = _other(db_url)
    try:
        results = race.run(
            lambda: update_study(db, "lower-one", StudyUpdate(budget=BudgetUpdate(n_trials=1))),
            lambda: trials.ask(other, "lower-one", policy=POLICY),
        )
    finally:
        other.dispose()
    assert not isinstance(results["first"], BaseException), results
    assert race.held_until == WAITED, race.held_until
    second = results["second"]
    assert isinstance(second, Conflict) and second.code == "budget_exhausted", (race.held_until, results)
    assert trials.list_trials(db, "lower-one").total == 1
    assert definition_of(load_record(db, "lower-one")).budget.n_trials == 1


@pytest.mark.parametrize("kind", ["complete", "pruned"])
def test_a_tell_that_lands_while_the_reaper_works_wins(
    db: Database, db_url: str, monkeypatch, kind: str
) -> None:
    """The reaper has picked a lapsed trial and holds the study lock; the worker's complete/pruned
    tell ends the lease before the reaper's own attempt to end it (the lease row decides: see
    ``claim_end``). The tell stands: no failure, no retry."""
    from caviar.service.trials import leases

    create_study(db, parse_definition(external_study("tell-first", n_trials=1, max_retries=2)))
    trial = trials.ask(db, "tell-first", policy=POLICY)
    real_claim = leases.claim_end
    told = threading.Event()
    results: dict[str, Any] = {}

    def reaper_claim(*args: Any, **kwargs: Any) -> bool:
        if threading.current_thread().name == "reaper" and not told.is_set():
            worker = threading.Thread(target=tell_now, name="worker")
            worker.start()  # the tell takes no study lock: it finishes while the reaper holds it
            worker.join(60)
            assert told.is_set(), results
        return real_claim(*args, **kwargs)

    def tell_now() -> None:
        other = _other(db_url)
        try:
            results["tell"] = trials.tell(
                other, "tell-first", trial.number, kind, values=[1.0] if kind == "complete" else None
            )
        except BaseException as exc:
            results["tell"] = exc
        finally:
            told.set()
            other.dispose()

    monkeypatch.setattr(leases, "claim_end", reaper_claim)
    reaper = threading.Thread(
        target=lambda: results.setdefault("reaped", reap(db, now=utcnow() + timedelta(hours=1))),
        name="reaper",
    )
    reaper.start()
    reaper.join(120)
    assert not isinstance(results["tell"], BaseException), results
    assert results["tell"].state == kind and results["reaped"] == 0
    counts = trials_counts(db, "tell-first")
    assert counts == {
        "waiting": 0,
        "running": 0,
        "complete": int(kind == "complete"),
        "pruned": int(kind == "pruned"),
        "fail": 0,
    }
    assert load_record(db, "tell-first").state == "completed"


@pytest.mark.parametrize("kind", ["complete", "pruned"])
def test_a_tell_overtaken_by_the_reaper_loses_its_lease(
    db: Database, db_url: str, monkeypatch, kind: str
) -> None:
    """The worker's complete/pruned tell is about to end the lease when the reaper ends it first,
    fails the trial and queues its retry: the tell answers lease_lost, writes nothing, and the
    retry is the only way on."""
    from caviar.service.trials import lifecycle

    create_study(db, parse_definition(external_study("reap-first", n_trials=1, max_retries=2)))
    trial = trials.ask(db, "reap-first", policy=POLICY)
    real_claim = lifecycle.end_told
    results: dict[str, Any] = {}

    other = _other(db_url)

    def reap_now() -> None:
        results["reaped"] = reap(other, now=utcnow() + timedelta(hours=1))

    def worker_claim(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "worker" and "reaper" not in results:
            results["reaper"] = reaper = threading.Thread(target=reap_now, name="reaper")
            reaper.start()  # another server's reaper: it takes the study lock, which the tell does not hold
            reaper.join(60)
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "end_told", worker_claim)

    def tell_now() -> None:
        try:
            results["tell"] = trials.tell(
                db, "reap-first", trial.number, kind, values=[1.0] if kind == "complete" else None
            )
        except BaseException as exc:
            results["tell"] = exc

    worker = threading.Thread(target=tell_now, name="worker")
    worker.start()
    worker.join(120)
    other.dispose()
    assert results["reaped"] == 1, results
    assert isinstance(results["tell"], Conflict) and results["tell"].code == "lease_lost", results
    counts = trials_counts(db, "reap-first")
    assert counts == {"waiting": 1, "running": 0, "complete": 0, "pruned": 0, "fail": 1}
    retry = trials.ask(db, "reap-first", policy=POLICY)
    assert retry.retry_of == trial.number and retry.params == trial.params
    trials.tell(db, "reap-first", retry.number, kind, values=[1.0] if kind == "complete" else None)
    assert load_record(db, "reap-first").state == "completed"


def _ask_in_another_process(url: str, name: str, reached: Any, out: Any) -> None:
    """A second server process's ask: marks ``reached`` where it counts the budget."""
    from caviar.service.trials import lifecycle

    real_count = lifecycle.record_with_counts

    def record_with_counts(*args: Any, **kwargs: Any) -> Any:
        reached.set()
        return real_count(*args, **kwargs)

    lifecycle.record_with_counts = record_with_counts
    db = Database(url, pool_size=1)
    try:
        out.put(("ok", trials.ask(db, name, policy=POLICY).number))
    except Conflict as exc:
        out.put(("conflict", exc.code))
    except BaseException as exc:
        out.put(("error", repr(exc)))
    finally:
        db.dispose()


def process_waits_on_study_lock(db: Database, study_id: int, pid: int) -> bool:
    """Whether process ``pid`` waits on the cross-process half of ``study_lock`` for ``study_id``:
    a blocked advisory lock in ``pg_locks``, or a blocked POSIX lock in ``/proc/locks`` (SQLite)."""
    if not db.is_sqlite:
        from caviar.service.db import _PG_LOCK_CLASS

        with db.engine.connect() as connection:
            waiting = connection.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                    "AND classid = :c AND objid = :o"
                ),
                {"c": _PG_LOCK_CLASS, "o": study_id},
            ).scalar()
        return bool(waiting)
    with open("/proc/locks") as locks:
        return any("->" in line and f" {pid} " in line for line in locks)


def test_an_ask_in_another_process_waits_for_the_lock(db: Database, db_url: str, monkeypatch) -> None:
    """The cross-process half of the study lock: this process's ask has counted the last free
    trial and holds the lock; another server process's ask must wait, then find the budget used."""
    from caviar.service.trials import lifecycle

    if db.is_sqlite and not os.path.exists("/proc/locks"):
        pytest.skip("needs /proc/locks to see a process waiting on the SQLite lock file")
    create_study(db, parse_definition(external_study("procs-last", n_trials=1)))
    study_id = load_record(db, "procs-last").id
    race = Interleaving()
    monkeypatch.setattr(lifecycle, "record_with_counts", race.point(lifecycle.record_with_counts, after=True))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()

    def start_second(reached: Any) -> Any:
        process = ctx.Process(target=_ask_in_another_process, args=(db_url, "procs-last", reached, out))
        process.start()
        race.second_waits = lambda: process_waits_on_study_lock(db, study_id, process.pid or -1)
        return process

    race.second_reached = ctx.Event()
    process = race.run_against_process(lambda: trials.ask(db, "procs-last", policy=POLICY), start_second)
    second = out.get(timeout=120)
    process.join(60)
    assert not isinstance(race.results["first"], BaseException), race.results
    assert race.held_until == WAITED, race.held_until
    assert second == ("conflict", "budget_exhausted"), (race.held_until, second)
    assert trials.list_trials(db, "procs-last").total == 1


def test_a_trial_whose_tell_died_after_ending_its_lease_is_recovered(db: Database) -> None:
    """A tell that ended the lease and then died (the server was killed before Optuna's write)
    leaves a running trial with no active lease: past TELL_GRACE_S the reaper fails and retries it."""
    create_study(db, parse_definition(external_study("untold", n_trials=2, max_retries=1)))
    asked = trials.ask(db, "untold", policy=POLICY)
    tid = trial_id(db, load_record(db, "untold"), asked.number)
    assert claim_end(db, tid, "finished", None)
    assert reap(db) == 0  # a live tell gets its grace
    assert db.optuna.get_trial(tid).state == TrialState.RUNNING
    with db.session() as session, session.begin():
        ended = utcnow() - timedelta(seconds=TELL_GRACE_S + 5)
        session.execute(update(TrialLease).where(TrialLease.trial_id == tid).values(expires_at=ended))
    assert reap(db) == 1
    trial = db.optuna.get_trial(tid)
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs[FAIL_REASON] == "lost while being told"
    listed = trials.list_trials(db, "untold", limit=10).items
    assert [t.retry_of for t in listed if t.retry_of is not None] == [asked.number]
