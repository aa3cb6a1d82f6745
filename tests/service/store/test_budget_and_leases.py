"""The store's contract, part 2: the budget rule, counting in SQL, the lease policy, renewal and
expiry, and what a lease's status answers.

Runs on SQLite and PostgreSQL (``CAVIAR_TEST_DATABASE``), as Optuna's own storage suite does.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from optuna.trial import TrialState

from caviar.service import store, trials
from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.errors import Conflict
from caviar.service.store import _leases
from caviar.storage import StudyRecord, TrialLease, utcnow
from tests.service.store.conftest import MakeStudy, enqueue

# ---- the budget rule ----------------------------------------------------------------------------


def _one_of_each(db: Database, make_study: MakeStudy) -> StudyRecord:
    """A study with one waiting, running, complete, pruned and failed trial each."""
    record = make_study("each", n_trials=10)
    enqueue(db, record, 0.01)  # waiting
    for lr, state in ((0.02, TrialState.RUNNING), (0.03, TrialState.PRUNED), (0.04, TrialState.FAIL)):
        trial_id = enqueue(db, record, lr)
        db.optuna.set_trial_state_values(trial_id, TrialState.RUNNING)
        if state != TrialState.RUNNING:
            db.optuna.set_trial_state_values(trial_id, state)
    enqueue(db, record, 0.05, value=0.5)  # complete
    return record


def test_waiting_running_complete_and_pruned_trials_use_the_budget(
    db: Database, make_study: MakeStudy
) -> None:
    record = _one_of_each(db, make_study)
    counted = store.count_states(db, record)  # by the database
    loaded = store.state_counts(store.all_trials(db, record))  # by Optuna's view of the trials
    assert counted == loaded
    assert {store.STATE_NAMES[s]: n for s, n in counted.items() if n} == {
        "waiting": 1,
        "running": 1,
        "complete": 1,
        "pruned": 1,
        "fail": 1,
    }
    assert store.used_count(counted) == 4  # the failed trial does not use the budget
    assert store.done_count(counted) == 2
    assert store.trial_total(db, record) == 5


def test_a_waiting_trial_alone_uses_the_budget() -> None:
    only_waiting = dict.fromkeys(TrialState, 0) | {TrialState.WAITING: 1}
    assert store.used_count(only_waiting) == 1
    assert store.used_count({TrialState.FAIL: 3}) == 0
    assert {
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.RUNNING,
        TrialState.WAITING,
    } == store.USING_BUDGET


def test_the_budget_is_spent_by_complete_and_pruned_trials_only() -> None:
    counts = {TrialState.COMPLETE: 2, TrialState.PRUNED: 1, TrialState.RUNNING: 5, TrialState.WAITING: 5}
    assert store.budget_spent(counts, 3) and not store.budget_spent(counts, 4)


def test_hand_backs_and_cancelled_trials_are_no_failures(db: Database, make_study: MakeStudy) -> None:
    record = make_study("failures")
    for attr in (None, store.RELEASED, store.CANCELLED):
        trial_id = enqueue(db, record)
        db.optuna.set_trial_state_values(trial_id, TrialState.RUNNING)
        if attr is not None:
            db.optuna.set_trial_user_attr(trial_id, attr, True)
        db.optuna.set_trial_state_values(trial_id, TrialState.FAIL)
    assert store.fail_count(store.all_trials(db, record)) == 1


def test_counts_over_all_studies_and_the_study_of_a_trial(db: Database, make_study: MakeStudy) -> None:
    first = make_study("first")
    second = make_study("second")
    enqueue(db, first)
    trial_id = enqueue(db, second, value=1.0)
    with db.session() as session:
        assert store.trials_by_state(session) == {"waiting": 1, "complete": 1}
        assert store.study_of_trial(session, trial_id) == second.optuna_study_id
        assert store.study_of_trial(session, trial_id + 1000) is None


# ---- the lease policy ----------------------------------------------------------------------


def test_the_lease_policy_comes_from_settings_and_lasts_two_heartbeats() -> None:
    policy = store.LeasePolicy.from_settings(Settings(heartbeat_interval_s=7))
    assert policy.heartbeat_interval_s == 7 and policy.lease_s == 14
    assert policy.margin_s == 3.5  # the reaper's grace: half an interval unless lease_margin_s says
    assert store.LeasePolicy.from_settings(Settings(heartbeat_interval_s=7, lease_margin_s=1)).margin_s == 1
    now = datetime(2026, 1, 1)
    assert policy.expiry(now) == now + timedelta(seconds=14)
    with pytest.raises(TypeError):
        store.LeasePolicy()  # type: ignore[call-arg]  # no default: it is built from Settings


# ---- renewal, expiry, and what a status answers -------------------------------------------------

POLICY = store.LeasePolicy(heartbeat_interval_s=10.0)


def _asked(db: Database, make_study: MakeStudy, name: str = "leased", worker_id: str | None = "w1") -> int:
    """A study with one trial asked for (running, with an active lease); returns the trial id."""
    record = make_study(name)
    trials.ask(db, name, worker_id=worker_id, policy=POLICY)
    return store.trial_id(db, record, 0)


def test_renewal_extends_an_active_lease_by_one_period(
    db: Database, make_study: MakeStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    trial_id = _asked(db, make_study)
    lease = store.lease_of(db, trial_id)
    assert lease is not None and lease.status == "active" and store.lease_error(lease) is None
    later = utcnow() + timedelta(seconds=5)  # renewals stamp the database's clock (tests may replace it)
    monkeypatch.setattr(
        _leases, "new_expiry", lambda _dialect, policy: later + timedelta(seconds=policy.lease_s)
    )
    assert store.renew(db, trial_id, POLICY) is True
    renewed = store.lease_of(db, trial_id)
    assert renewed is not None and renewed.expires_at == later + timedelta(seconds=20)
    assert store.leases_for(db, [trial_id])[trial_id].expires_at == renewed.expires_at


def test_a_lapsed_lease_is_reaped_and_then_answers_lease_lost(db: Database, make_study: MakeStudy) -> None:
    trial_id = _asked(db, make_study)
    lease = store.lease_of(db, trial_id)
    assert lease is not None
    assert trials.reap(db, now=lease.expires_at - timedelta(seconds=1)) == 0  # not lapsed yet
    assert trials.reap(db, now=lease.expires_at + timedelta(seconds=1)) == 1
    reaped = store.lease_of(db, trial_id)
    assert reaped is not None and reaped.status == "reaped"
    assert store.lease_error(reaped) == "lease_lost"
    assert store.renew(db, trial_id, POLICY) is False  # a reaped lease is never renewed
    record = store.load_record(db, "leased")
    with pytest.raises(Conflict) as caught:
        store.check_running(db, record, db.optuna.get_trial(trial_id))
    assert caught.value.code == "lease_lost"


def test_renew_leases_renews_only_active_ones(db: Database, make_study: MakeStudy) -> None:
    record = make_study("many", n_trials=3)
    for _ in range(3):
        trials.ask(db, "many", policy=POLICY)
    ids = [store.trial_id(db, record, n) for n in range(3)]
    store.close_lease(db, ids[1], "told")
    store.end_lease(db, ids[2], "released", "handed back")
    with db.session() as session, session.begin():
        assert store.renew_leases(session, ids, POLICY) == 1
        assert store.renew_leases(session, [], POLICY) == 0
    leases = store.leases_for(db, ids)
    assert [leases[i].status for i in ids] == ["active", "finished", "released"]
    assert leases[ids[1]].reason == "told"


def test_renew_leases_renews_the_named_trials_only_not_their_study_mates(
    db: Database, make_study: MakeStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live worker's heartbeat must not keep a crashed worker's lease of the same study alive."""
    record = make_study("mates", n_trials=3)
    for worker in ("live", "crashed"):
        trials.ask(db, "mates", worker_id=worker, policy=POLICY)
    live, crashed = (store.trial_id(db, record, n) for n in range(2))
    before = store.lease_of(db, crashed)
    later = utcnow() + timedelta(seconds=5)
    monkeypatch.setattr(_leases, "utcnow", lambda: later)
    with db.session() as session, session.begin():
        assert store.renew_leases(session, [live], POLICY) == 1
    leases = store.leases_for(db, [live, crashed])
    assert leases[live].expires_at == later + timedelta(seconds=20)
    assert before is not None and leases[crashed].expires_at == before.expires_at


@pytest.mark.parametrize(
    ("status", "code"),
    [("active", None), ("finished", "trial_finished"), ("reaped", "lease_lost"), ("released", "lease_lost")],
)
def test_the_lease_status_to_error_map(status: str, code: str | None) -> None:
    now = utcnow()
    lease = TrialLease(trial_id=1, study_id=1, number=0, status=status, started_at=now, expires_at=now)
    assert store.lease_error(lease) == code


def test_a_trial_belongs_to_the_worker_that_asked(db: Database, make_study: MakeStudy) -> None:
    lease = store.lease_of(db, _asked(db, make_study, worker_id="w1"))
    assert not store.held_by_other(lease, "w1")
    assert store.held_by_other(lease, "w2") and store.held_by_other(lease, None)
    assert not store.held_by_other(None, "w2")  # a trial created outside caviar has no owner
    anonymous = store.lease_of(db, _asked(db, make_study, "anonymous", worker_id=None))
    assert not store.held_by_other(anonymous, "w2")


def test_check_running_refuses_finished_and_waiting_trials(db: Database, make_study: MakeStudy) -> None:
    trial_id = _asked(db, make_study)
    record = store.load_record(db, "leased")
    assert store.check_running(db, record, db.optuna.get_trial(trial_id)) is not None
    waiting = enqueue(db, record)
    with pytest.raises(Conflict) as caught:
        store.check_running(db, record, db.optuna.get_trial(waiting))
    assert caught.value.code == "trial_not_running"
    db.optuna.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0])
    store.close_lease(db, trial_id, None)
    with pytest.raises(Conflict) as caught:
        store.check_running(db, record, db.optuna.get_trial(trial_id))
    assert caught.value.code == "trial_finished"
