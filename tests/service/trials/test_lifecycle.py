"""The trial lifecycle called in-process on a database: ask, report, heartbeat, tell, hand-back, reap.

No app, no server, no threads: each test calls the domain functions directly, so each runs in a
fraction of a second. This is the trials run's first test selection in ``make mutants``
(tools/mutants.py): every value a user relies on is asserted exactly (budgets, states, reasons,
counts, numbers), so a mutant of the lifecycle, the leases, the outcomes or the store dies here
before the slower API tests run.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from optuna.trial import TrialState
from sqlalchemy import update

from caviar.service import trials
from caviar.service.db import Database
from caviar.service.errors import Conflict, InvalidInput, NotFound, RateLimited
from caviar.service.store import (
    ASKED,
    READY,
    WORKER,
    LeasePolicy,
    LeaseRow,
    create_study,
    lease_of,
    lease_rows,
    load_record,
    parse_definition,
    trial_id,
)
from caviar.service.studies.schemas import BudgetUpdate, StudyUpdate
from caviar.service.studies.service import delete_study, pause_study
from caviar.service.studies.steering import resume_study, stop_study, update_study
from caviar.service.trials import lifecycle, reap
from caviar.service.trials.enqueue import enqueue
from caviar.service.trials.leases import Caller, end_overdue
from caviar.service.trials.schemas import EnqueueItem
from caviar.storage import StudyRecord, TrialLease, utcnow
from tests.service.helpers import POLICY, external_study

PARAMS = {"lr": 0.01, "beta1": 0.9, "dropout": 0.1}
LATER = timedelta(hours=1)  # every lease of POLICY (60 s) has lapsed by then
EXPIRED = "lease expired (no heartbeat)"


def make(db: Database, name: str = "s", *, n_trials: int = 10, **budget: Any) -> StudyRecord:
    return create_study(db, parse_definition(external_study(name, n_trials=n_trials, **budget)))


def make_with(db: Database, name: str = "s", *, n_trials: int = 10, **fields: Any) -> StudyRecord:
    """A study with other top-level fields (pruner, directions)."""
    data = {**external_study(name, n_trials=n_trials), **fields}
    return create_study(db, parse_definition(data))


def ask(db: Database, name: str = "s", **kwargs: Any) -> int:
    return trials.ask(db, name, policy=POLICY, **kwargs).number


def states(db: Database, name: str = "s") -> dict[int, str]:
    return {t.number: t.state for t in trials.list_trials(db, name, limit=1000).items}


def counts(db: Database, name: str = "s") -> Counter[str]:
    return Counter(states(db, name).values())


def study_state(db: Database, name: str = "s") -> str:
    return load_record(db, name).state


def lease(db: Database, number: int, name: str = "s") -> TrialLease:
    found = lease_of(db, trial_id(db, load_record(db, name), number))
    assert found is not None
    return found


def refused(call: Any, *args: Any, **kwargs: Any) -> str:
    """The error code of a refused call."""
    return refusal(call, *args, **kwargs)[0]


def refusal(call: Any, *args: Any, **kwargs: Any) -> tuple[str, str]:
    """The error code and message of a refused call."""
    with pytest.raises((Conflict, InvalidInput, RateLimited, NotFound)) as info:
        call(*args, **kwargs)
    return str(info.value.code), str(info.value)


def put(db: Database, *params: dict[str, Any], name: str = "s") -> list[int]:
    return [t.number for t in enqueue(db, name, [EnqueueItem(params=p) for p in params])]


# ---- ask: budgets and order ------------------------------------------------------------------


def test_ask_hands_out_exactly_n_trials_then_budget_exhausted(db: Database) -> None:
    make(db, n_trials=3)
    assert study_state(db) == "queued"
    assert [ask(db, worker_id="w") for _ in range(3)] == [0, 1, 2]
    assert study_state(db) == "running"
    assert load_record(db, "s").started_at is not None
    assert refused(trials.ask, db, "s", policy=POLICY) == "budget_exhausted"
    assignment = trials.get_trial(db, "s", 1)
    assert (assignment.state, assignment.worker_id, assignment.retry_of) == ("running", "w", None)
    held = lease(db, 2)
    assert (held.status, held.worker_id, held.attempt, held.retry_of, held.deadline_at) == (
        "active",
        "w",
        0,
        None,
        None,
    )


def test_an_assignment_carries_its_lease_and_sampled_params(db: Database) -> None:
    make(db)
    before = utcnow()
    assignment = trials.ask(db, "s", policy=POLICY, worker_id="w")
    assert (assignment.study, assignment.number, assignment.heartbeat_interval_s) == ("s", 0, 30.0)
    assert assignment.retry_of is None
    expires = assignment.lease_expires_at
    assert before + timedelta(seconds=59) <= expires <= utcnow() + timedelta(seconds=61)
    assert set(assignment.params) == {"lr", "beta1", "dropout"}
    assert 1e-4 <= assignment.params["lr"] <= 1e-1 and 0.8 <= assignment.params["beta1"] <= 0.999
    assert trials.get_trial(db, "s", 0).params == assignment.params
    trial = db.optuna.get_trial(trial_id(db, load_record(db, "s"), 0))
    assert trial.user_attrs[ASKED] is True


def test_fixed_params_are_kept_and_the_rest_sampled(db: Database) -> None:
    make(db)
    assignment = trials.ask(db, "s", policy=POLICY, fixed={"dropout": 0.25, "beta1": 0.95})
    assert assignment.params["dropout"] == 0.25
    assert assignment.params["beta1"] == pytest.approx(0.95)
    assert trials.get_trial(db, "s", 0).params["beta1"] == pytest.approx(0.95)
    assert refused(trials.ask, db, "s", policy=POLICY, fixed={"dropout": 0.9}) == "out_of_range"


def test_the_same_request_id_answers_the_same_trial(db: Database) -> None:
    make(db, n_trials=2)
    first = trials.ask(db, "s", policy=POLICY, request_id="r1")
    again = trials.ask(db, "s", policy=POLICY, request_id="r1")
    assert (again.number, again.params) == (first.number, first.params)
    assert ask(db, request_id="r2") == 1
    assert counts(db) == Counter({"running": 2})
    trials.tell(db, "s", 0, "complete", values=[1.0])
    assert trials.ask(db, "s", policy=POLICY, request_id="r1").number == 0  # still replays


def test_waiting_trials_count_against_the_budget_and_are_asked_first(db: Database) -> None:
    make(db, n_trials=3)
    assert ask(db) == 0
    assert put(db, {**PARAMS, "lr": 0.02}, {**PARAMS, "lr": 0.03}) == [1, 2]
    assert refused(put, db, PARAMS) == "budget_exhausted"
    first = trials.ask(db, "s", policy=POLICY)
    second = trials.ask(db, "s", policy=POLICY)
    assert (first.number, first.params["lr"]) == (1, pytest.approx(0.02))
    assert (second.number, second.params["lr"]) == (2, pytest.approx(0.03))
    assert first.params["beta1"] == pytest.approx(0.9)
    assert refused(trials.ask, db, "s", policy=POLICY) == "budget_exhausted"
    assert counts(db) == Counter({"running": 3})


def test_a_waiting_trial_is_asked_even_when_the_finished_ones_fill_the_budget(db: Database) -> None:
    make(db, n_trials=2, max_retries=1)
    ask(db)
    ask(db)
    trials.tell(db, "s", 0, "complete", values=[1.0])
    trials.tell(db, "s", 1, "fail")
    assignment = trials.ask(db, "s", policy=POLICY)
    assert (assignment.number, assignment.retry_of) == (2, 1)
    assert refused(trials.ask, db, "s", policy=POLICY) == "budget_exhausted"


def test_max_parallel_is_exact_and_frees_a_slot_on_tell(db: Database) -> None:
    make(db, n_trials=10, max_parallel=2)
    assert [ask(db), ask(db)] == [0, 1]
    with pytest.raises(RateLimited) as info:
        trials.ask(db, "s", policy=POLICY)
    assert (info.value.code, info.value.retry_after_s) == ("max_parallel_reached", 15)
    assert "already runs 2 trials" in str(info.value)
    trials.tell(db, "s", 0, "pruned")
    assert ask(db) == 2


def test_paused_stopped_and_failed_studies_refuse_asks_in_that_order(db: Database) -> None:
    make(db, n_trials=5)
    ask(db)
    pause_study(db, "s")
    assert refused(trials.ask, db, "s", policy=POLICY) == "study_paused"
    resume_study(db, "s")
    assert study_state(db) == "running"
    assert ask(db) == 1
    stop_study(db, "s", reason="enough")
    assert study_state(db) == "stopping"
    with pytest.raises(Conflict) as info:
        trials.ask(db, "s", policy=POLICY)
    assert info.value.code == "study_stopped"
    assert str(info.value) == "study 's' is stopping (stopped by request: enough)"
    make(db, "f", n_trials=5, max_retries=0, max_failed_trials=0)
    ask(db, "f")
    trials.tell(db, "f", 0, "fail")
    assert study_state(db, "f") == "failed"
    assert refused(trials.ask, db, "f", policy=POLICY) == "study_failed"


def test_raising_n_trials_reopens_a_completed_study(db: Database) -> None:
    make(db, n_trials=1)
    ask(db)
    trials.tell(db, "s", 0, "complete", values=[0.5])
    assert study_state(db) == "completed"
    assert refused(trials.ask, db, "s", policy=POLICY) == "budget_exhausted"
    update_study(db, "s", StudyUpdate(budget=BudgetUpdate(n_trials=2)))
    assert study_state(db) == "running"
    assert ask(db) == 1
    assert refused(update_study, db, "s", StudyUpdate(budget=BudgetUpdate(n_trials=1))) == "budget_below_used"


# ---- report ------------------------------------------------------------------------------------


def test_report_records_values_and_answers_the_pruner(db: Database) -> None:
    make_with(db, pruner={"type": "threshold", "options": {"lower": 0.5}})
    ask(db)
    assert trials.report(db, "s", 0, 1, 0.9, policy=POLICY) is False
    assert trials.report(db, "s", 0, 2, 0.4, policy=POLICY) is True
    assert trials.get_trial(db, "s", 0).intermediate_values == {1: 0.9, 2: 0.4}
    assert refused(trials.report, db, "s", 0, 3, float("nan"), policy=POLICY) == "non_finite_value"
    assert refused(trials.report, db, "s", 0, 3, float("inf"), policy=POLICY) == "non_finite_value"


def test_a_batch_of_reports_answers_each_and_records_the_ones_it_can(db: Database) -> None:
    make_with(db, pruner={"type": "threshold", "options": {"lower": 0.5}}, n_trials=5)
    for _ in range(3):
        ask(db)
    trials.release(db, "s", 2)
    batch = [
        trials.Reported(0, 1, 0.9),
        trials.Reported(1, 1, 0.4),  # below the threshold
        trials.Reported(2, 1, 0.9),  # handed back
        trials.Reported(7, 1, 0.9),  # no such trial
        trials.Reported(1, 2, 0.8, proves=lambda lease: False),  # named twice, and not the caller's
    ]
    results = trials.report_many(db, "s", batch, policy=POLICY)
    assert [(r.number, r.step, r.should_prune, r.code) for r in results] == [
        (0, 1, False, None),
        (1, 1, True, None),
        (2, 1, True, "lease_lost"),
        (7, 1, True, "trial_not_found"),
        (1, 2, True, "not_your_trial"),
    ]
    assert [trials.get_trial(db, "s", n).intermediate_values for n in range(3)] == [{1: 0.9}, {1: 0.4}, {}]
    proved = trials.report_many(
        db, "s", [trials.Reported(0, 2, 0.7, proves=lambda lease: lease.number == 0)], policy=POLICY
    )
    assert proved == [trials.ReportResult(0, 2, False)]
    with pytest.raises(InvalidInput, match=r"reports\[1\]\.value"):
        trials.report_many(
            db, "s", [trials.Reported(0, 3, 0.5), trials.Reported(1, 3, float("nan"))], policy=POLICY
        )
    assert trials.get_trial(db, "s", 0).intermediate_values == {1: 0.9, 2: 0.7}


def test_report_without_a_pruner_never_prunes_and_renews_the_lease(db: Database) -> None:
    make(db)
    ask(db)
    before = lease(db, 0).expires_at
    assert trials.report(db, "s", 0, 1, -1e9, policy=POLICY) is False
    assert lease(db, 0).expires_at >= before
    assert reap(db, now=utcnow() + timedelta(seconds=50)) == 0
    assert trials.get_trial(db, "s", 0).state == "running"


def test_report_tells_a_stopping_studys_trials_to_stop(db: Database) -> None:
    make(db)
    ask(db)
    stop_study(db, "s")
    assert trials.report(db, "s", 0, 1, 1.0, policy=POLICY) is True
    assert trials.get_trial(db, "s", 0).intermediate_values == {1: 1.0}


def test_report_on_a_finished_or_reaped_trial_is_refused(db: Database) -> None:
    make(db, n_trials=5)
    ask(db)
    ask(db)
    trials.tell(db, "s", 0, "complete", values=[1.0])
    assert refused(trials.report, db, "s", 0, 1, 1.0, policy=POLICY) == "trial_finished"
    assert reap(db, now=utcnow() + LATER) == 1
    assert refused(trials.report, db, "s", 1, 1, 1.0, policy=POLICY) == "lease_lost"
    assert trials.get_trial(db, "s", 1).intermediate_values == {}


def test_report_to_a_multi_objective_study_is_refused(db: Database) -> None:
    make_with(db, direction=None, directions=["maximize", "minimize"])
    ask(db)
    assert refused(trials.report, db, "s", 0, 1, 1.0, policy=POLICY) == "multi_objective_report"


def test_a_caller_without_the_claim_is_refused(db: Database) -> None:
    make(db)
    ask(db)
    stranger = Caller(worker_id="x", any_trial=False)
    assert refused(trials.report, db, "s", 0, 1, 1.0, policy=POLICY, caller=stranger) == "not_your_trial"
    assert refused(trials.heartbeat, db, "s", 0, policy=POLICY, caller=stranger) == "not_your_trial"
    assert refused(trials.tell, db, "s", 0, "pruned", caller=stranger) == "not_your_trial"
    assert refused(trials.release, db, "s", 0, caller=stranger) == "not_your_trial"
    assert trials.get_trial(db, "s", 0).state == "running"


# ---- tell --------------------------------------------------------------------------------------


def test_tell_complete_stores_values_and_a_repeat_is_idempotent(db: Database) -> None:
    make(db)
    ask(db, worker_id="w")
    told = trials.tell(db, "s", 0, "complete", values=[0.75], user_attrs={"epochs": 3})
    assert (told.state, told.value, told.values, told.user_attrs["epochs"]) == ("complete", 0.75, [0.75], 3)
    assert lease(db, 0).status == "finished"
    again = trials.tell(db, "s", 0, "complete", values=[0.75])
    assert (again.number, again.state, again.value) == (0, "complete", 0.75)
    assert refused(trials.tell, db, "s", 0, "complete", values=[0.5]) == "trial_finished"
    assert refused(trials.tell, db, "s", 0, "pruned") == "trial_finished"
    assert refused(trials.tell, db, "s", 0, "fail") == "trial_finished"
    assert trials.get_trial(db, "s", 0).value == 0.75


def test_tell_pruned_and_repeat(db: Database) -> None:
    make(db)
    ask(db)
    told = trials.tell(db, "s", 0, "pruned")
    assert (told.state, told.value, told.values) == ("pruned", None, None)
    assert trials.tell(db, "s", 0, "pruned").state == "pruned"
    assert refused(trials.tell, db, "s", 0, "complete", values=[1.0]) == "trial_finished"


def test_bad_tells_are_refused_with_their_codes(db: Database) -> None:
    make(db)
    ask(db)
    assert refused(trials.tell, db, "s", 0, "done") == "validation_error"
    assert refused(trials.tell, db, "s", 0, "complete") == "validation_error"
    assert refused(trials.tell, db, "s", 0, "complete", values=[1.0, 2.0]) == "wrong_number_of_values"
    assert refused(trials.tell, db, "s", 0, "complete", values=[float("inf")]) == "non_finite_value"
    assert refused(trials.tell, db, "s", 0, "pruned", values=[1.0]) == "validation_error"
    assert refused(trials.tell, db, "s", 0, "fail", values=[1.0]) == "validation_error"
    assert trials.get_trial(db, "s", 0).state == "running"


def test_a_multi_objective_tell_takes_one_value_per_objective(db: Database) -> None:
    make_with(db, direction=None, directions=["maximize", "minimize"])
    ask(db)
    assert refused(trials.tell, db, "s", 0, "complete", values=[1.0]) == "wrong_number_of_values"
    told = trials.tell(db, "s", 0, "complete", values=[1.0, 2.0])
    assert (told.value, told.values) == (None, [1.0, 2.0])


def test_a_tell_after_the_reaper_is_lease_lost_and_the_retry_runs(db: Database) -> None:
    make(db, max_retries=1)
    ask(db)
    assert reap(db, now=utcnow() + LATER) == 1
    assert refused(trials.tell, db, "s", 0, "complete", values=[1.0]) == "lease_lost"
    assert refused(trials.tell, db, "s", 0, "fail") == "lease_lost"
    assert refused(trials.heartbeat, db, "s", 0, policy=POLICY) == "lease_lost"
    reaped = trials.get_trial(db, "s", 0)
    assert (reaped.state, reaped.fail_reason) == ("fail", EXPIRED)
    held = lease(db, 0)
    assert (held.status, held.reason) == ("reaped", EXPIRED)
    assert states(db) == {0: "fail", 1: "waiting"}


def test_tell_on_a_waiting_trial_is_not_running(db: Database) -> None:
    make(db)
    put(db, PARAMS)
    assert refused(trials.tell, db, "s", 0, "fail") == "trial_not_running"
    assert refused(trials.tell, db, "s", 0, "complete", values=[1.0]) == "trial_not_running"
    assert refused(trials.heartbeat, db, "s", 0, policy=POLICY) == "trial_not_running"
    assert states(db) == {0: "waiting"}


# ---- failures and retries --------------------------------------------------------------------


def test_a_failed_trial_is_retried_with_its_params_until_max_retries(db: Database) -> None:
    make(db, n_trials=3, max_retries=2, max_failed_trials=10)
    first = trials.ask(db, "s", policy=POLICY)
    told = trials.tell(db, "s", 0, "fail", reason="x" * 2500)
    assert (told.state, told.fail_reason) == ("fail", "x" * 2000)
    assert lease(db, 0).status == "finished"
    retry = trials.ask(db, "s", policy=POLICY)
    assert (retry.number, retry.retry_of, retry.params) == (1, 0, first.params)
    assert lease(db, 1).attempt == 1
    trials.tell(db, "s", 1, "fail")
    second = trials.ask(db, "s", policy=POLICY)
    assert (second.number, second.retry_of, second.params) == (2, 1, first.params)
    assert lease(db, 2).attempt == 2
    trials.tell(db, "s", 2, "fail")
    assert states(db) == {0: "fail", 1: "fail", 2: "fail"}  # no third retry
    assert trials.tell(db, "s", 2, "fail").state == "fail"  # a repeated fail is the same trial
    fresh = trials.ask(db, "s", policy=POLICY)
    assert (fresh.number, fresh.retry_of) == (3, None)
    assert lease(db, 3).attempt == 0


def test_max_retries_zero_retries_nothing(db: Database) -> None:
    make(db, max_retries=0)
    ask(db)
    trials.tell(db, "s", 0, "fail")
    assert states(db) == {0: "fail"}


def test_failures_beyond_max_failed_trials_fail_the_study(db: Database) -> None:
    make(db, n_trials=10, max_retries=0, max_failed_trials=1)
    ask(db)
    ask(db)
    trials.tell(db, "s", 0, "fail")
    assert study_state(db) == "running"
    trials.tell(db, "s", 1, "fail")
    assert study_state(db) == "failed"
    update_study(db, "s", StudyUpdate(budget=BudgetUpdate(max_failed_trials=2)))
    assert study_state(db) == "running"


def test_a_fatal_failure_pauses_the_study_and_retries_nothing(db: Database) -> None:
    make(db, max_retries=2)
    ask(db)
    trials.tell(db, "s", 0, "fail", reason="cannot read output", fatal=True)
    record = load_record(db, "s")
    assert (record.state, record.stop_reason) == ("paused", "paused: cannot read output")
    assert states(db) == {0: "fail"}
    make(db, "t")
    ask(db, "t")
    trials.tell(db, "t", 0, "fail", fatal=True)
    assert load_record(db, "t").stop_reason == "paused: fatal failure"


def test_a_hand_back_requeues_without_using_a_retry(db: Database) -> None:
    make(db, n_trials=2, max_retries=0, max_failed_trials=0)
    first = trials.ask(db, "s", policy=POLICY, worker_id="w")
    trials.release(db, "s", 0)
    handed = trials.get_trial(db, "s", 0)
    assert (handed.state, handed.fail_reason) == ("fail", "handed back by worker")
    held = lease(db, 0)
    assert (held.status, held.reason) == ("released", "handed back by worker")
    assert study_state(db) == "running"  # a hand-back is no failure
    again = trials.ask(db, "s", policy=POLICY)
    assert (again.number, again.retry_of, again.params) == (1, 0, first.params)
    assert lease(db, 1).attempt == 0
    trials.release(db, "s", 1, reason="out of memory")
    assert trials.get_trial(db, "s", 1).fail_reason == "out of memory"
    assert refused(trials.tell, db, "s", 1, "complete", values=[1.0]) == "lease_lost"
    trials.release(db, "s", 1)  # no longer running: nothing happens
    assert states(db) == {0: "fail", 1: "fail", 2: "waiting"}


def test_a_retrys_hand_back_keeps_its_attempt(db: Database) -> None:
    make(db, max_retries=1)
    ask(db)
    trials.tell(db, "s", 0, "fail")
    ask(db)
    trials.release(db, "s", 1)
    assignment = trials.ask(db, "s", policy=POLICY)
    assert (assignment.number, assignment.retry_of) == (2, 1)
    assert lease(db, 2).attempt == 1
    trials.tell(db, "s", 2, "fail")
    assert states(db) == {0: "fail", 1: "fail", 2: "fail"}


# ---- settling ----------------------------------------------------------------------------------


def test_the_study_completes_when_the_budget_is_spent_and_nothing_runs(db: Database) -> None:
    make(db, n_trials=2)
    ask(db)
    ask(db)
    trials.tell(db, "s", 0, "complete", values=[1.0])
    assert study_state(db) == "running"
    trials.tell(db, "s", 1, "pruned")
    assert study_state(db) == "completed"


def test_a_failure_at_the_end_waits_for_its_retry(db: Database) -> None:
    make(db, n_trials=2, max_retries=1)
    ask(db)
    ask(db)
    trials.tell(db, "s", 0, "complete", values=[1.0])
    trials.tell(db, "s", 1, "fail")
    assert study_state(db) == "running"
    assert states(db) == {0: "complete", 1: "fail", 2: "waiting"}
    ask(db)
    trials.tell(db, "s", 2, "complete", values=[2.0])
    assert study_state(db) == "completed"


def test_a_goal_reached_stops_the_study(db: Database) -> None:
    make(db, n_trials=10, goal={"value": 0.9})
    ask(db)
    ask(db)
    trials.tell(db, "s", 0, "complete", values=[0.5])
    assert study_state(db) == "running"
    trials.tell(db, "s", 1, "complete", values=[0.95])
    record = load_record(db, "s")
    assert record.state == "stopped"
    assert record.stop_reason == "goal reached: trial 1 value=0.95 >= 0.9"


def test_a_stop_cancels_waiting_trials_and_ends_when_the_last_runs_out(db: Database) -> None:
    make(db, n_trials=5, max_retries=1)
    ask(db)
    ask(db)
    put(db, PARAMS)
    stop_study(db, "s", reason="why")
    record = load_record(db, "s")
    assert (record.state, record.stop_reason) == ("stopping", "stopped by request: why")
    cancelled = trials.get_trial(db, "s", 2)
    assert (cancelled.state, cancelled.fail_reason) == ("fail", "cancelled: stopped by request: why")
    with pytest.raises(Conflict) as info:
        trials.heartbeat(db, "s", 0, policy=POLICY)
    assert info.value.code == "study_stopped"
    trials.tell(db, "s", 0, "fail")  # no retry in a stopping study
    assert study_state(db) == "stopping"
    trials.tell(db, "s", 1, "complete", values=[1.0])
    assert study_state(db) == "stopped"
    assert states(db) == {0: "fail", 1: "complete", 2: "fail"}
    assert refused(stop_study, db, "s") == "invalid_state"


def test_a_stop_without_running_trials_is_stopped_at_once(db: Database) -> None:
    make(db)
    stop_study(db, "s")
    record = load_record(db, "s")
    assert (record.state, record.stop_reason) == ("stopped", "stopped by request")


# ---- heartbeats and the reaper ---------------------------------------------------------------


def test_a_heartbeat_renews_the_lease_so_the_reaper_spares_it(db: Database) -> None:
    make(db, n_trials=5, max_retries=1)
    ask(db)
    ask(db)
    with db.session() as session, session.begin():  # both leases nearly lapsed
        for held in session.query(TrialLease):
            held.expires_at = utcnow() + timedelta(seconds=1)
    trials.heartbeat(db, "s", 0, policy=POLICY)
    renewed = lease(db, 0).expires_at
    assert renewed > utcnow() + timedelta(seconds=50)
    assert reap(db, now=utcnow() + timedelta(seconds=30)) == 1
    assert states(db) == {0: "running", 1: "fail", 2: "waiting"}
    assert trials.get_trial(db, "s", 2).retry_of == 1
    assert reap(db, now=utcnow() + timedelta(seconds=30)) == 0


def test_the_reaper_spares_live_leases_and_finished_trials(db: Database) -> None:
    make(db)
    ask(db)
    ask(db)
    trials.tell(db, "s", 1, "complete", values=[1.0])
    assert reap(db, now=utcnow()) == 0
    assert reap(db) == 0  # by the database's clock
    assert reap(db, now=utcnow() + LATER) == 1
    assert states(db) == {0: "fail", 1: "complete", 2: "waiting"}
    assert reap(db, now=utcnow() + LATER) == 0


def test_a_trial_past_its_timeout_is_reaped_although_it_heartbeats(db: Database) -> None:
    make(db, max_retries=0, trial_timeout_s=10)
    ask(db)
    held = lease(db, 0)
    assert held.deadline_at is not None
    assert held.started_at + timedelta(seconds=10) == held.deadline_at
    assert reap(db, now=utcnow() + timedelta(seconds=5)) == 0
    trials.heartbeat(db, "s", 0, policy=POLICY)
    assert reap(db, now=utcnow() + timedelta(seconds=20)) == 1
    reaped = trials.get_trial(db, "s", 0)
    assert (reaped.state, reaped.fail_reason) == ("fail", "trial timeout")
    assert (lease(db, 0).status, lease(db, 0).reason) == ("reaped", "trial timeout")


def test_reaped_failures_count_towards_max_failed_trials(db: Database) -> None:
    make(db, n_trials=5, max_retries=0, max_failed_trials=1)
    ask(db)
    ask(db)
    assert reap(db, now=utcnow() + LATER) == 2
    assert study_state(db) == "failed"


def test_an_orphan_asked_without_a_lease_is_failed_and_retried(db: Database) -> None:
    make(db, n_trials=5, max_retries=1)
    first = trials.ask(db, "s", policy=POLICY)
    ask(db)
    with db.session() as session, session.begin():  # the ask of trial 0 died before its lease
        session.delete(session.get(TrialLease, trial_id(db, load_record(db, "s"), 0)))
    assert reap(db, now=utcnow()) == 1
    orphan = trials.get_trial(db, "s", 0)
    assert (orphan.state, orphan.fail_reason) == ("fail", "lost while being handed out")
    assert states(db) == {0: "fail", 1: "running", 2: "waiting"}
    retry = trials.ask(db, "s", policy=POLICY)
    assert (retry.number, retry.retry_of, retry.params) == (2, 0, first.params)
    assert reap(db, now=utcnow()) == 0


def test_a_study_past_its_deadline_is_ended_by_the_reaper(db: Database) -> None:
    make(db, n_trials=5, max_duration_s=60)
    ask(db)
    assert reap(db, now=utcnow() + timedelta(seconds=30)) == 0
    assert study_state(db) == "running"
    assert end_overdue(db, now=utcnow() + timedelta(seconds=59)) == []
    assert end_overdue(db, now=utcnow() + timedelta(seconds=61)) == ["s"]
    record = load_record(db, "s")
    assert (record.state, record.stop_reason) == (
        "stopping",
        "deadline: budget.max_duration_s=60 s passed since the first trial",
    )
    assert reap(db, now=utcnow() + LATER) == 1
    assert study_state(db) == "stopped"
    assert states(db) == {0: "fail"}  # no retry after the deadline


# ---- what the refusals say -------------------------------------------------------------------


def test_refusals_name_the_trial_the_study_and_why(db: Database) -> None:
    make(db, n_trials=5, max_retries=0)
    ask(db)
    ask(db)
    ask(db)
    stranger = Caller(worker_id="x", any_trial=False)
    assert refusal(trials.release, db, "s", 2, caller=stranger) == (
        "not_your_trial",
        "trial 2 of 's' is not yours: send the credential its ask answered (header X-Caviar-Lease), "
        "or use a token with write scope",
    )
    not_yours = (
        "not_your_trial",
        "trial 1 of 's' is not yours: send the credential its ask answered (header X-Caviar-Lease), "
        "or use a token with write scope",
    )
    assert refusal(trials.report, db, "s", 1, 1, 1.0, policy=POLICY, caller=stranger) == not_yours
    assert refusal(trials.heartbeat, db, "s", 1, policy=POLICY, caller=stranger) == not_yours
    assert refusal(trials.report, db, "s", 2, 1, float("nan"), policy=POLICY) == (
        "non_finite_value",
        "value: must be a finite number (got nan)",
    )
    trials.tell(db, "s", 0, "complete", values=[1.0])
    assert refusal(trials.report, db, "s", 0, 1, 1.0, policy=POLICY) == (
        "trial_finished",
        "trial 0 of 's' is already finished",
    )
    assert refusal(trials.tell, db, "s", 0, "pruned") == (
        "trial_finished",
        "trial 0 of 's' already finished as complete",
    )
    trials.release(db, "s", 1, reason="stopping")
    assert refusal(trials.report, db, "s", 1, 1, 1.0, policy=POLICY) == (
        "lease_lost",
        "trial 1 of 's' lost its lease (stopping); its retry runs instead",
    )
    assert refusal(trials.tell, db, "s", 1, "pruned") == (
        "lease_lost",
        "trial 1 of 's' lost its lease; its retry runs instead",
    )
    put(db, PARAMS)
    assert refusal(trials.report, db, "s", 3, 1, 1.0, policy=POLICY) == (
        "trial_not_running",
        "trial 3 of 's' is not running",
    )
    assert refusal(trials.tell, db, "s", 3, "fail") == ("trial_not_running", "trial 3 of 's' is not running")
    make_with(db, "m", direction=None, directions=["maximize", "minimize"])
    ask(db, "m")
    assert refusal(trials.report, db, "m", 0, 1, 1.0, policy=POLICY) == (
        "multi_objective_report",
        "report: intermediate values are for single-objective studies only (as in Optuna)",
    )


def test_lowering_n_trials_below_what_is_used_is_refused(db: Database) -> None:
    make(db, n_trials=5)
    for _ in range(3):
        ask(db)
    trials.tell(db, "s", 0, "complete", values=[1.0])
    code, message = refusal(update_study, db, "s", StudyUpdate(budget=BudgetUpdate(n_trials=2)))
    assert (code, message) == (
        "budget_below_used",
        "budget.n_trials: 3 trials are already used (complete 1, pruned 0, running 2, waiting 0); "
        "n_trials cannot be lower",
    )
    assert update_study(db, "s", StudyUpdate(budget=BudgetUpdate(n_trials=3))).state == "running"
    assert refused(trials.ask, db, "s", policy=POLICY) == "budget_exhausted"


def test_stopping_a_stopping_study_again_answers_it(db: Database) -> None:
    make(db, n_trials=5)
    ask(db)
    assert stop_study(db, "s", reason="first").state == "stopping"
    again = stop_study(db, "s", reason="second")
    assert (again.state, again.stop_reason) == ("stopping", "stopped by request: first")
    trials.tell(db, "s", 0, "pruned")
    assert study_state(db) == "stopped"
    assert refusal(stop_study, db, "s") == ("invalid_state", "study 's' is stopped and cannot be stopped")


# ---- replays, renewals, trials asked outside caviar, a study created again ---------------------


def test_a_request_id_belongs_to_its_study(db: Database) -> None:
    make(db, "a")
    make(db, "b")
    assert ask(db, "a", request_id="r") == 0
    assert ask(db, "b", request_id="r") == 0
    assert counts(db, "a") == Counter({"running": 1}) and counts(db, "b") == Counter({"running": 1})


def test_a_replay_of_an_ask_still_sampling_waits_then_answers_ask_in_progress(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    make(db)
    first = trials.ask(db, "s", policy=POLICY, request_id="r")
    tid = trial_id(db, load_record(db, "s"), 0)
    db.optuna.set_trial_system_attr(tid, READY, False)  # as if its sampling had not finished
    monkeypatch.setattr(lifecycle, "REPLAY_WAIT_S", 0.2)
    sleeps: list[float] = []
    monkeypatch.setattr(lifecycle.time, "sleep", lambda s: sleeps.append(s))
    with pytest.raises(Conflict) as info:
        trials.ask(db, "s", policy=POLICY, request_id="r")
    assert (info.value.code, info.value.retry_after_s) == ("ask_in_progress", 1)
    assert str(info.value) == "the ask 'r' of 's' is still being answered; repeat it shortly"
    assert sleeps and set(sleeps) == {0.05}
    trials.tell(db, "s", 0, "pruned")  # a finished trial is answered at once
    sleeps.clear()
    assert trials.ask(db, "s", policy=POLICY, request_id="r").params == first.params
    assert sleeps == []


def nearly_lapsed(db: Database) -> None:
    with db.session() as session, session.begin():
        for held in session.query(TrialLease):
            held.expires_at = utcnow() + timedelta(seconds=1)


def test_a_report_and_a_heartbeat_renew_the_lease_by_one_period(db: Database) -> None:
    make(db)
    ask(db)
    nearly_lapsed(db)
    trials.report(db, "s", 0, 1, 0.5, policy=POLICY)
    assert lease(db, 0).expires_at > utcnow() + timedelta(seconds=55)
    nearly_lapsed(db)
    trials.heartbeat(db, "s", 0, policy=POLICY)
    assert lease(db, 0).expires_at > utcnow() + timedelta(seconds=55)
    nearly_lapsed(db)
    trials.heartbeat(db, "s", 0, policy=POLICY, caller=Caller(worker_id="w"))
    assert lease(db, 0).expires_at > utcnow() + timedelta(seconds=55)


def test_a_trial_asked_outside_caviar_runs_unleased(db: Database) -> None:
    record = make(db)
    tid = db.optuna.create_new_trial(record.optuna_study_id)  # Optuna's own ask: no lease
    assert trials.report(db, "s", 0, 1, 0.5, policy=POLICY) is False
    trials.heartbeat(db, "s", 0, policy=POLICY)
    assert trials.get_trial(db, "s", 0).intermediate_values == {1: 0.5}
    assert reap(db, now=utcnow() + LATER) == 0  # never asked through caviar: not the reaper's
    stop_study(db, "s", reason="r")
    assert refusal(trials.heartbeat, db, "s", 0, policy=POLICY) == (
        "study_stopped",
        "study 's' is stopping (stopped by request: r)",
    )
    assert trials.report(db, "s", 0, 2, 0.5, policy=POLICY) is True
    db.optuna.set_trial_state_values(tid, TrialState.COMPLETE, [1.0])
    assert refusal(trials.report, db, "s", 0, 3, 0.5, policy=POLICY) == (
        "trial_finished",
        "trial 0 of 's' is already finished",
    )


def test_a_report_on_a_trial_finished_behind_its_lease_is_trial_finished(db: Database) -> None:
    make(db)
    ask(db)
    tid = trial_id(db, load_record(db, "s"), 0)
    db.optuna.set_trial_state_values(tid, TrialState.COMPLETE, [1.0])  # told through Optuna directly
    assert lease(db, 0).status == "active"
    assert refusal(trials.report, db, "s", 0, 1, 0.5, policy=POLICY) == (
        "trial_finished",
        "trial 0 of 's' is already finished",
    )


def test_a_study_deleted_and_created_again_is_the_new_one(db: Database) -> None:
    make(db, n_trials=5)
    ask(db)
    trials.report(db, "s", 0, 1, 0.5, policy=POLICY)
    delete_study(db, "s")
    make(db, n_trials=5)
    assert refused(trials.report, db, "s", 0, 1, 0.5, policy=POLICY) == "trial_not_found"
    assert ask(db) == 0
    assert trials.report(db, "s", 0, 1, 0.25, policy=POLICY) is False
    assert trials.get_trial(db, "s", 0).intermediate_values == {1: 0.25}
    delete_study(db, "s")
    make(db, n_trials=5)
    assert ask(db) == 0  # the ask's remembered identity is stale too
    assert counts(db) == Counter({"running": 1})


def test_lease_rows_read_each_named_trial_with_its_study(db: Database) -> None:
    a = make(db, "a")
    b = make(db, "b")
    ask(db, "a", worker_id="wa")
    ask(db, "a")
    ask(db, "b", worker_id="wb")
    trials.tell(db, "a", 1, "pruned")
    stop_study(db, "b")
    assert lease_rows(db, []) == {}
    rows = lease_rows(db, [("a", 0), ("a", 1), ("b", 0), ("b", 0), ("b", 5), ("c", 0)])
    assert rows == {
        ("a", 0): LeaseRow(trial_id(db, a, 0), a.id, 0, "wa", "active", "a", "running"),
        ("a", 1): LeaseRow(trial_id(db, a, 1), a.id, 1, None, "finished", "a", "running"),
        ("b", 0): LeaseRow(trial_id(db, b, 0), b.id, 0, "wb", "active", "b", "stopping"),
    }
    assert (rows[("a", 0)].error, rows[("a", 1)].error) == (None, "trial_finished")


def test_best_is_the_best_complete_trial_ties_to_the_earlier(db: Database) -> None:
    make(db, "max")
    assert refusal(trials.best, db, "max") == (
        "no_completed_trials",
        "study 'max' has no completed trials yet",
    )
    for value in (0.5, 0.9, 0.9, 0.1):
        trials.tell(db, "max", ask(db, "max"), "complete", values=[value])
    best = trials.best(db, "max")
    assert (best.number, best.value) == (1, 0.9)  # type: ignore[union-attr]
    make_with(db, "min", direction="minimize")
    for value in (0.5, 0.1, 0.1, 0.9):
        trials.tell(db, "min", ask(db, "min"), "complete", values=[value])
    best = trials.best(db, "min")
    assert (best.number, best.value) == (1, 0.1)  # type: ignore[union-attr]


# ---- the reaper's clock, orphans in every live study, trials finished behind their lease -------


def age_leases(db: Database, seconds: float) -> None:
    """Every active lease lapsed ``seconds`` ago (by this host's clock, which is the database's)."""
    with db.session() as session, session.begin():
        for held in session.query(TrialLease):
            held.expires_at = utcnow() - timedelta(seconds=seconds)


def test_the_reaper_judges_by_the_database_clock_with_its_margin(db: Database) -> None:
    make(db, max_retries=0)
    ask(db)
    age_leases(db, 20)
    assert reap(db, margin_s=60) == 0  # still within the grace
    assert trials.get_trial(db, "s", 0).state == "running"
    assert reap(db, margin_s=5) == 1
    assert trials.get_trial(db, "s", 0).fail_reason == EXPIRED


def test_the_reaper_ends_trials_past_their_deadline_by_the_database_clock(db: Database) -> None:
    make(db, max_retries=0, trial_timeout_s=30)
    ask(db)
    assert reap(db) == 0
    with db.session() as session, session.begin():
        for held in session.query(TrialLease):
            held.deadline_at = utcnow() - timedelta(seconds=5)
    assert reap(db) == 1
    assert trials.get_trial(db, "s", 0).fail_reason == "trial timeout"


def test_a_trial_finished_behind_its_lease_is_not_reaped_or_retried(db: Database) -> None:
    make(db, max_retries=2)
    ask(db)
    db.optuna.set_trial_state_values(trial_id(db, load_record(db, "s"), 0), TrialState.COMPLETE, [1.0])
    assert reap(db, now=utcnow() + LATER) == 0
    held = lease(db, 0)
    assert (held.status, held.reason) == ("finished", EXPIRED)
    assert states(db) == {0: "complete"}


def orphan(db: Database, name: str, number: int) -> None:
    """Trial ``number`` of ``name`` as an ask that died before its lease leaves it."""
    with db.session() as session, session.begin():
        session.delete(session.get(TrialLease, trial_id(db, load_record(db, name), number)))


def test_the_reaper_recovers_orphans_of_every_live_study_and_counts_each(db: Database) -> None:
    for name in ("leased", "paused", "stopping", "two"):
        make(db, name, max_retries=1)
    ask(db, "leased")  # a running trial with its lease: no orphan, and the scan goes on
    ask(db, "paused")
    orphan(db, "paused", 0)
    pause_study(db, "paused")
    ask(db, "stopping")
    ask(db, "stopping")
    orphan(db, "stopping", 0)
    stop_study(db, "stopping")
    ask(db, "two")
    ask(db, "two")
    orphan(db, "two", 0)
    orphan(db, "two", 1)
    assert reap(db, now=utcnow()) == 4
    assert states(db, "leased") == {0: "running"}
    assert states(db, "paused") == {0: "fail", 1: "waiting"}
    assert states(db, "stopping") == {0: "fail", 1: "running"}  # no retry in a stopping study
    assert states(db, "two") == {0: "fail", 1: "fail", 2: "waiting", 3: "waiting"}


def test_the_reaper_ends_a_paused_study_past_its_deadline_by_its_own_clock(db: Database) -> None:
    make(db, n_trials=5, max_duration_s=60)
    ask(db)
    trials.tell(db, "s", 0, "complete", values=[1.0])
    pause_study(db, "s")
    assert reap(db, now=utcnow() + timedelta(seconds=30)) == 0
    assert study_state(db) == "paused"
    assert reap(db, now=utcnow() + timedelta(seconds=61)) == 0
    record = load_record(db, "s")
    assert (record.state, record.stop_reason) == (
        "stopped",
        "deadline: budget.max_duration_s=60 s passed since the first trial",
    )


# ---- more of what the refusals and reads say -------------------------------------------------


def test_bad_tells_say_what_is_wrong(db: Database) -> None:
    make(db)
    ask(db)
    assert refusal(trials.tell, db, "s", 0, "done") == (
        "validation_error",
        "state: must be complete, pruned or fail (got 'done')",
    )
    assert refusal(trials.tell, db, "s", 0, "complete") == (
        "validation_error",
        "value: a complete trial needs value (or values)",
    )
    assert refusal(trials.tell, db, "s", 0, "complete", values=[1.0, 2.0]) == (
        "wrong_number_of_values",
        "values: the study has 1 objective(s), got 2 value(s)",
    )
    code, message = refusal(trials.tell, db, "s", 0, "complete", values=[float("nan")])
    assert code == "non_finite_value" and message.startswith("values: ")
    assert refusal(trials.tell, db, "s", 0, "pruned", values=[1.0]) == (
        "validation_error",
        "values: a pruned trial takes no values",
    )
    stranger = Caller(worker_id="x", any_trial=False)
    assert refusal(trials.tell, db, "s", 0, "pruned", caller=stranger)[1].startswith(
        "trial 0 of 's' is not yours"
    )
    assert refusal(trials.report, db, "s", 7, 1, 1.0, policy=POLICY) == (
        "trial_not_found",
        "study 's' has no trial 7",
    )
    put(db, PARAMS)
    assert refusal(trials.tell, db, "s", 1, "complete", values=[1.0]) == (
        "trial_not_running",
        "trial 1 of 's' is not running",
    )


def test_a_fatal_reason_is_kept_to_2000_characters(db: Database) -> None:
    make(db)
    ask(db)
    trials.tell(db, "s", 0, "fail", reason="y" * 2500, fatal=True)
    assert load_record(db, "s").stop_reason == "paused: " + "y" * 1992


def test_imported_results_that_fill_the_budget_complete_a_queued_study(db: Database) -> None:
    make(db, n_trials=2)
    added = enqueue(db, "s", [EnqueueItem(params=PARAMS, value=0.5), EnqueueItem(params=PARAMS, value=0.7)])
    assert [(t.state, t.value) for t in added] == [("complete", 0.5), ("complete", 0.7)]
    assert added[0].user_attrs["beta1"] == pytest.approx(0.9)  # decoded, as the dashboard shows it
    assert study_state(db) == "completed"


def test_a_trial_read_has_its_times_in_utc(db: Database) -> None:
    make(db)
    ask(db)
    trials.tell(db, "s", 0, "complete", values=[1.0])
    read = trials.get_trial(db, "s", 0)
    assert read.started_at is not None and read.finished_at is not None
    assert read.started_at.utcoffset() == timedelta(0)
    assert read.started_at <= read.finished_at <= utcnow()


def test_an_orphaned_retry_has_used_its_attempt(db: Database) -> None:
    make(db, max_retries=1)
    ask(db)
    trials.tell(db, "s", 0, "fail")
    assert trials.ask(db, "s", policy=POLICY).retry_of == 0
    orphan(db, "s", 1)  # the retry's ask died before its lease: its attempt (1) counts all the same
    assert reap(db, now=utcnow()) == 1
    assert states(db) == {0: "fail", 1: "fail"}


# ---- what an ask checks and writes ---------------------------------------------------------------


def test_an_ask_refuses_with_the_study_named(db: Database) -> None:
    make(db, n_trials=1, max_retries=0, max_failed_trials=0)
    pause_study(db, "s")
    assert refusal(trials.ask, db, "s", policy=POLICY) == ("study_paused", "study 's' is paused")
    resume_study(db, "s")
    ask(db)
    trials.tell(db, "s", 0, "complete", values=[1.0])
    assert refusal(trials.ask, db, "s", policy=POLICY) == (
        "budget_exhausted",
        "study 's' has used its budget of 1 trials",
    )
    make(db, "f", max_retries=0, max_failed_trials=0)
    ask(db, "f")
    trials.tell(db, "f", 0, "fail")
    assert refusal(trials.ask, db, "f", policy=POLICY) == (
        "study_failed",
        "study 'f' failed: too many failed trials",
    )
    code, message = refusal(trials.ask, db, "s", policy=POLICY, fixed={"dropout": 0.9})
    assert (code, message.split(":")[0]) == ("out_of_range", "fixed.dropout")


def test_max_parallel_asks_again_after_half_a_heartbeat_and_at_least_a_second(db: Database) -> None:
    make(db, max_parallel=1)
    ask(db)
    with pytest.raises(RateLimited) as info:
        trials.ask(db, "s", policy=LeasePolicy(heartbeat_interval_s=1.0))
    assert info.value.retry_after_s == 1


def test_an_ask_ends_a_study_past_its_deadline_before_the_reaper_does(db: Database) -> None:
    make(db, n_trials=5, max_duration_s=60)
    ask(db)
    trials.tell(db, "s", 0, "complete", values=[1.0])
    with db.session() as session, session.begin():
        session.execute(update(StudyRecord).values(started_at=utcnow() - timedelta(seconds=61)))
    assert refusal(trials.ask, db, "s", policy=POLICY) == (
        "study_stopped",
        "study 's' is stopped (deadline: budget.max_duration_s=60 s passed since the first trial)",
    )


def test_an_ask_records_when_a_study_without_a_start_time_started(db: Database) -> None:
    make(db, "a")
    make(db, "b")
    ask(db, "a")
    with db.session() as session, session.begin():  # a study that started before started_at existed
        session.execute(update(StudyRecord).where(StudyRecord.name == "a").values(started_at=None))
    ask(db, "a")
    assert load_record(db, "a").started_at is not None
    assert load_record(db, "b").started_at is None  # another study's is not touched


def test_an_asked_trial_carries_its_worker_and_only_the_decoded_reversed_params(db: Database) -> None:
    make(db)
    put(db, PARAMS)
    for _ in range(2):
        trials.ask(db, "s", policy=POLICY, worker_id="w")
    for number in (0, 1):
        stored = db.optuna.get_trial(trial_id(db, load_record(db, "s"), number))
        assert (stored.user_attrs[WORKER], stored.user_attrs[ASKED]) == ("w", True)
        shown = trials.get_trial(db, "s", number).user_attrs
        assert set(shown) == {"beta1"} and 0.8 <= shown["beta1"] <= 0.999
    assert trials.get_trial(db, "s", 0).user_attrs["beta1"] == pytest.approx(0.9)


def test_an_enqueued_trial_whose_ask_died_is_recovered(db: Database) -> None:
    make(db, max_retries=1)
    put(db, PARAMS)
    ask(db)
    orphan(db, "s", 0)
    assert reap(db, now=utcnow()) == 1
    assert states(db) == {0: "fail", 1: "waiting"}


def test_an_ask_after_a_study_was_created_again_keeps_what_it_was_given(db: Database) -> None:
    make(db)
    ask(db)
    delete_study(db, "s")
    make(db)
    assignment = trials.ask(db, "s", policy=POLICY, worker_id="w2", request_id="r2", fixed={"dropout": 0.3})
    assert (assignment.number, assignment.params["dropout"]) == (0, 0.3)
    assert lease(db, 0).worker_id == "w2" and lease(db, 0).request_id == "r2"


def test_a_goal_of_a_minimized_metric_is_reached_from_above(db: Database) -> None:
    make_with(db, direction="minimize", budget={"n_trials": 10, "goal": {"value": 0.1}})
    ask(db)
    ask(db)
    trials.tell(db, "s", 0, "complete", values=[0.5])
    assert study_state(db) == "running"
    trials.tell(db, "s", 1, "complete", values=[0.05])
    assert load_record(db, "s").stop_reason == "goal reached: trial 1 value=0.05 <= 0.1"
