"""The store's contract, part 1: study records, definitions, trials, state changes, the state map.

Runs on SQLite and PostgreSQL (``CAVIAR_TEST_DATABASE``), as Optuna's own storage suite does.
"""

from __future__ import annotations

import pytest
from optuna.trial import TrialState
from sqlalchemy import update

from caviar.service import store
from caviar.service.db import Database
from caviar.service.errors import Conflict, InvalidInput, NotFound
from caviar.storage import StudyRecord
from tests.service.helpers import external_study
from tests.service.store.conftest import MakeStudy, enqueue

# ---- create, load, definition ---------------------------------------------------------------


def test_create_makes_the_row_and_the_optuna_study_of_the_same_name(
    db: Database, make_study: MakeStudy
) -> None:
    record = make_study("alpha", n_trials=7)
    assert record.state == "queued" and record.objective_kind == "external"
    assert db.optuna.get_study_id_from_name("alpha") == record.optuna_study_id
    loaded = store.load_record(db, "alpha")
    assert (loaded.id, loaded.optuna_study_id) == (record.id, record.optuna_study_id)
    assert db.optuna.get_study_system_attrs(record.optuna_study_id)[store.METRIC_NAMES_ATTR] == ["value"]


def test_the_definition_round_trips_and_follows_each_edit(db: Database, make_study: MakeStudy) -> None:
    record = make_study("edited", n_trials=5)
    definition = store.definition_of(store.load_record(db, "edited"))
    assert definition == store.parse_definition(external_study("edited", n_trials=5))
    assert store.definition_of(store.load_record(db, "edited")) is definition  # parsed once
    data = definition.model_dump(mode="json")
    data["budget"]["n_trials"] = 9
    with db.session() as session, session.begin():
        session.execute(
            update(StudyRecord)
            .where(StudyRecord.id == record.id)
            .values(definition=data, definition_version=StudyRecord.definition_version + 1)
        )
    assert store.definition_of(store.load_record(db, "edited")).budget.n_trials == 9


def test_a_name_is_taken_by_a_caviar_or_an_optuna_study(db: Database, make_study: MakeStudy) -> None:
    make_study("taken")
    with pytest.raises(Conflict) as caught:
        make_study("taken")
    assert caught.value.code == "name_taken"
    db.optuna.create_new_study([], "optuna-only")  # created behind caviar's back
    with pytest.raises(Conflict) as caught:
        make_study("optuna-only")
    assert caught.value.code == "name_taken"


def test_a_failed_create_leaves_no_optuna_study(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    definition = store.parse_definition(external_study("half"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(type(db.optuna), "set_study_user_attr", refuse)
    with pytest.raises(RuntimeError):
        store.create_study(db, definition)
    monkeypatch.undo()
    assert "half" not in [s.study_name for s in db.optuna.get_all_studies()]
    assert store.create_study(db, definition).name == "half"  # the name is free


def test_unknown_studies_and_trials_are_not_found(db: Database, make_study: MakeStudy) -> None:
    with pytest.raises(NotFound) as caught:
        store.load_record(db, "nope")
    assert caught.value.code == "study_not_found"
    record = make_study("gone")
    with pytest.raises(NotFound) as caught:
        store.frozen(db, record, 0)
    assert caught.value.code == "trial_not_found"
    with db.session() as session, session.begin():
        session.delete(store.get_record(session, "gone"))
    with pytest.raises(NotFound):
        store.reload(db, record)


def test_parse_definition_names_the_field() -> None:
    data = external_study("bad")
    data["budget"]["n_trials"] = 0
    with pytest.raises(InvalidInput) as caught:
        store.parse_definition(data)
    assert "budget.n_trials" in caught.value.message


def test_trials_are_read_through_optuna_by_state(db: Database, make_study: MakeStudy) -> None:
    record = make_study("reads")
    enqueue(db, record, 0.01)
    enqueue(db, record, 0.02, value=0.5)
    assert [t.state for t in store.all_trials(db, record)] == [TrialState.WAITING, TrialState.COMPLETE]
    (complete,) = store.all_trials(db, record, [TrialState.COMPLETE])
    assert store.frozen(db, record, complete.number).values == [0.5]
    assert store.trial_id(db, record, complete.number) == complete._trial_id
    assert store.trial_total(db, record) == 2


def test_the_queue_is_by_priority_then_age_and_only_runnable_studies(
    db: Database, make_study: MakeStudy
) -> None:
    make_study("old")
    high = make_study("high")
    paused = make_study("paused")
    with db.session() as session, session.begin():
        session.execute(update(StudyRecord).where(StudyRecord.id == high.id).values(priority=5))
        store.set_state(session, store.get_record(session, "paused"), "paused")
    assert [r.name for r in store.runnable_studies(db)] == ["high", "old"]
    assert [r.name for r in store.runnable_studies(db, names=["old", "paused"])] == ["old"]
    assert store.runnable_studies(db, kinds=["trainer"]) == []
    assert store.count_studies_by_state(db) == {"queued": 2, "paused": 1}
    assert store.reload(db, paused).state == "paused"


# ---- state changes ----------------------------------------------------------------------------


def test_transition_is_a_compare_and_set(db: Database, make_study: MakeStudy) -> None:
    record = make_study("cas")
    assert store.transition(db, record, ["queued"], "running") is True
    assert store.transition(db, record, ["queued"], "paused") is False  # not queued any more
    assert store.reload(db, record).state == "running"


def test_a_spent_budget_completes_the_study_once_nothing_waits(db: Database, make_study: MakeStudy) -> None:
    record = make_study("done", n_trials=2)
    enqueue(db, record, 0.01, value=0.1)
    enqueue(db, record, 0.02, value=0.2)
    waiting = enqueue(db, record, 0.03)
    store.transition(db, record, ["queued"], "running")
    store.settle_study(db, record)
    assert store.reload(db, record).state == "running"  # a waiting trial is still to run
    db.optuna.set_trial_state_values(waiting, TrialState.RUNNING)
    db.optuna.set_trial_state_values(waiting, TrialState.PRUNED)
    store.settle_study(db, record)
    assert store.reload(db, record).state == "completed"


def test_too_many_failures_fail_the_study_but_hand_backs_do_not_count(
    db: Database, make_study: MakeStudy
) -> None:
    record = make_study("fails", max_failed_trials=1)
    store.transition(db, record, ["queued"], "running")
    for index, handed_back in enumerate((True, True, False)):
        trial_id = enqueue(db, record, 0.01 + index / 100)
        db.optuna.set_trial_state_values(trial_id, TrialState.RUNNING)
        if handed_back:
            db.optuna.set_trial_user_attr(trial_id, store.RELEASED, True)
        db.optuna.set_trial_state_values(trial_id, TrialState.FAIL)
    store.settle_study(db, record)
    assert store.reload(db, record).state == "running"  # one real failure: not beyond 1
    trial_id = enqueue(db, record, 0.05)
    db.optuna.set_trial_state_values(trial_id, TrialState.RUNNING)
    db.optuna.set_trial_state_values(trial_id, TrialState.FAIL)
    store.settle_study(db, record)
    assert store.reload(db, record).state == "failed"


def test_ending_a_study_cancels_waiting_trials_and_waits_for_running_ones(
    db: Database, make_study: MakeStudy
) -> None:
    record = make_study("ended")
    waiting = enqueue(db, record, 0.01)
    running = enqueue(db, record, 0.02)
    db.optuna.set_trial_state_values(running, TrialState.RUNNING)
    assert store.end_study(db, record, "stopped by request") is True
    assert store.reload(db, record).state == "stopping"
    cancelled = db.optuna.get_trial(waiting)
    assert cancelled.state == TrialState.FAIL and cancelled.user_attrs[store.CANCELLED] is True
    assert cancelled.user_attrs[store.FAIL_REASON] == "cancelled: stopped by request"
    assert store.fail_count([cancelled]) == 0  # a cancelled trial is no failure
    db.optuna.set_trial_state_values(running, TrialState.COMPLETE, [1.0])
    store.settle_study(db, record)
    assert store.reload(db, record).state == "stopped"
    assert store.end_study(db, record, "again") is False  # stopped studies stay stopped


def test_a_deadline_ends_a_started_study(db: Database, make_study: MakeStudy) -> None:
    from datetime import timedelta

    from caviar.storage import utcnow

    record = make_study("late", max_duration_s=60)
    definition = store.definition_of(record)
    assert store.deadline_passed(definition, record) is None  # not started
    store.transition(db, record, ["queued"], "running", started_at=utcnow() - timedelta(seconds=61))
    started = store.reload(db, record)
    assert (store.deadline_passed(definition, started) or "").startswith("deadline:")
    assert store.end_reason(db, definition, started) == store.deadline_passed(definition, started)


# ---- the state map ----------------------------------------------------------------------------


def test_the_state_map_names_every_optuna_state_once() -> None:
    assert set(store.STATE_NAMES) == set(TrialState)
    assert len(set(store.STATE_NAMES.values())) == len(store.STATE_NAMES)
    assert store.FINISHED_BY_NAME == {
        "complete": TrialState.COMPLETE,
        "pruned": TrialState.PRUNED,
        "fail": TrialState.FAIL,
    }
    assert store.states_named("waiting") == [TrialState.WAITING]
    assert store.states_named("lost") == []


def test_trials_by_id_reads_what_get_trial_reads_in_one_go_or_one_by_one(
    db: Database, make_study: MakeStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = make_study("several")
    ids = [enqueue(db, record, lr=0.01 * (i + 1)) for i in range(3)]
    db.optuna.set_trial_intermediate_value(ids[1], 0, 0.5)
    expected = {tid: db.optuna.get_trial(tid) for tid in ids}
    assert store.trials_by_id(db, record.optuna_study_id, ids[:2]) == {tid: expected[tid] for tid in ids[:2]}
    assert store.trials_by_id(db, record.optuna_study_id, []) == {}
    backend = db.optuna._backend  # type: ignore[attr-defined]
    monkeypatch.delattr(type(backend), "_get_trials")  # another Optuna storage: one read per trial
    assert store.trials_by_id(db, record.optuna_study_id, ids) == expected
