"""The store's contract, part 3: a warm start at creation, trials added as Optuna does, artifacts.

Runs on SQLite and PostgreSQL (``CAVIAR_TEST_DATABASE``), in-process and fast: these tests are part
of the trials run of ``make mutants`` (tools/mutants.py), which mutates the whole store.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState

from caviar.service import store
from caviar.service.db import Database
from caviar.service.definition import check_params
from caviar.service.errors import InvalidInput, NotFound
from caviar.service.store import definition_of
from caviar.service.studies.service import delete_study
from caviar.service.trials import artifacts as trial_artifacts
from caviar.service.trials import ask, best, report, tell
from tests.service.helpers import POLICY, external_study
from tests.service.store.conftest import MakeStudy, enqueue

VALUES = {0.01: 0.1, 0.02: 0.9, 0.03: 0.5, 0.04: 0.7, 0.05: 0.3, 0.06: 0.8}  # lr -> value


def finished_source(db: Database, make_study: MakeStudy) -> None:
    """A study ``src`` whose complete trials have lr 0.01 ... 0.06 and the values above."""
    record = make_study("src", n_trials=10)
    for lr, value in VALUES.items():
        enqueue(db, record, lr, value=value)


def warm(db: Database, name: str, *, n_trials: int = 10, top_k: int = 10, **space: Any) -> dict[str, Any]:
    body = external_study(name, n_trials=n_trials)
    body["search_space"].update(space)
    body["warm_start"] = {"from": "src", "top_k": top_k}
    record = store.create_study(db, store.parse_definition(body))
    assert record.warm_start is not None
    return record.warm_start


def waiting_lrs(db: Database, name: str) -> list[float]:
    record = store.load_record(db, name)
    trials = sorted(store.all_trials(db, record, [TrialState.WAITING]), key=lambda t: t.number)
    return [round(t.system_attrs["fixed_params"]["lr"], 6) for t in trials]


def test_a_warm_start_enqueues_the_top_k_best_in_order(db: Database, make_study: MakeStudy) -> None:
    finished_source(db, make_study)
    summary = warm(db, "w", top_k=3)
    assert summary == {"from": "src", "enqueued": 3, "skipped": 0, "reasons": []}
    assert waiting_lrs(db, "w") == [0.02, 0.06, 0.04]  # values 0.9, 0.8, 0.7
    record = store.load_record(db, "w")
    first = min(store.all_trials(db, record, [TrialState.WAITING]), key=lambda t: t.number)
    assert first.user_attrs[store.WARM_START_FROM] == "src#1"
    assert first.system_attrs["fixed_params"]["one_minus_beta1"] == pytest.approx(0.1)  # stored reversed
    assert first.user_attrs["beta1"] == pytest.approx(0.9)  # and shown decoded


def test_a_warm_start_skips_misfits_repeats_and_what_the_budget_cannot_hold(
    db: Database, make_study: MakeStudy
) -> None:
    finished_source(db, make_study)
    narrowed = {"lr": {"type": "float", "low": 0.025, "high": 0.1, "scale": "log"}}
    summary = warm(db, "w", n_trials=2, **narrowed)
    assert (summary["from"], summary["enqueued"], summary["skipped"]) == ("src", 2, 4)
    reasons = {r["number"]: r["reason"] for r in summary["reasons"]}
    assert waiting_lrs(db, "w") == [0.06, 0.04]
    assert reasons[1].startswith("params.lr: ")  # lr 0.02, below the narrowed range
    assert reasons[2] == "budget.n_trials reached"  # lr 0.03, value 0.5
    assert reasons[0].startswith("params.lr: ") and reasons[4] == "budget.n_trials reached"
    categorical = {"kind": {"type": "categorical", "choices": ["y"]}}
    missing = warm(db, "k", top_k=2, **categorical)
    assert (missing["enqueued"], missing["skipped"]) == (0, 2)
    assert all(r["reason"].startswith("params.kind: missing") for r in missing["reasons"])


def test_a_warm_start_skips_a_trial_with_the_same_parameters_as_a_better_one(
    db: Database, make_study: MakeStudy
) -> None:
    record = make_study("src")
    enqueue(db, record, 0.02, value=0.9)
    enqueue(db, record, 0.02, value=0.5)
    enqueue(db, record, 0.03, value=0.1)
    summary = warm(db, "w")
    assert summary == {
        "from": "src",
        "enqueued": 2,
        "skipped": 1,
        "reasons": [{"number": 1, "reason": "same parameters as a better trial"}],
    }


def test_at_most_ten_reasons_are_kept(db: Database, make_study: MakeStudy) -> None:
    record = make_study("src", n_trials=20)
    for i in range(12):
        enqueue(db, record, 0.01 + i / 1000, value=float(i))
    summary = warm(db, "w", n_trials=1, top_k=13)
    assert (summary["enqueued"], summary["skipped"], len(summary["reasons"])) == (1, 11, 10)


def test_a_warm_start_from_an_unknown_study_creates_nothing(db: Database) -> None:
    body = external_study("w")
    body["warm_start"] = {"from": "nowhere"}
    with pytest.raises(InvalidInput) as info:
        store.create_study(db, store.parse_definition(body))
    assert (info.value.code, info.value.message) == (
        "unknown_study",
        "warm_start.from: no study named 'nowhere'",
    )
    assert info.value.details == [{"field": "warm_start.from", "message": "no study named 'nowhere'"}]
    with pytest.raises(KeyError):
        db.optuna.get_study_id_from_name("w")


def test_an_added_complete_trial_teaches_the_sampler_and_a_waiting_one_is_asked(
    db: Database, make_study: MakeStudy
) -> None:
    record = make_study("s")
    done = enqueue(db, record, 0.02, value=0.5)
    trial = db.optuna.get_trial(done)
    assert (trial.state, trial.values, round(trial.params["lr"], 6)) == (TrialState.COMPLETE, [0.5], 0.02)
    assert set(trial.distributions) == set(trial.params)
    waiting = db.optuna.get_trial(enqueue(db, record, 0.03))
    assert (waiting.state, waiting.params, waiting.values) == (TrialState.WAITING, {}, None)
    assignment = ask(db, "s", policy=POLICY)
    assert (assignment.number, assignment.params["lr"]) == (1, pytest.approx(0.03))


def test_artifacts_are_private_and_listed_per_study(
    db: Database, make_study: MakeStudy, tmp_path: Path
) -> None:
    folder = tmp_path / "artifacts"
    artifacts = store.artifact_store(str(folder))
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    make_study("s")
    make_study("other")
    ask(db, "s", policy=POLICY)
    ask(db, "other", policy=POLICY)
    ids = []
    for name in ("s", "s", "other"):
        study = optuna.Study(study_name=name, storage=db.optuna)
        trial = optuna.Trial(study, study.get_trials(deepcopy=False)[0]._trial_id)
        path = tmp_path / f"{len(ids)}.txt"
        path.write_text("checkpoint")
        ids.append(upload_artifact(artifact_store=artifacts, file_path=str(path), study_or_trial=trial))
    for artifact_id in ids:
        assert stat.S_IMODE(os.stat(folder / artifact_id).st_mode) == 0o600
        with artifacts.open_reader(artifact_id) as reader:
            assert reader.read() == b"checkpoint"
    assert sorted(store.artifact_ids(db, store.load_record(db, "s"))) == sorted(ids[:2])
    assert store.artifact_ids(db, store.load_record(db, "other")) == ids[2:]
    tell(db, "s", 0, "complete", values=[1.0])
    assert sorted(store.artifact_ids(db, store.load_record(db, "s"))) == sorted(ids[:2])
    study = optuna.Study(study_name="s", storage=db.optuna)
    study_level = upload_artifact(
        artifact_store=artifacts, file_path=str(tmp_path / "0.txt"), study_or_trial=study
    )
    assert sorted(store.artifact_ids(db, store.load_record(db, "s"))) == sorted([*ids[:2], study_level])
    assert definition_of(store.load_record(db, "s")).name == "s"
    artifacts.write("raw", io.BytesIO(b"x"))
    assert stat.S_IMODE(os.stat(folder / "raw").st_mode) == 0o600


def test_a_warm_start_from_several_objectives_takes_front_after_front(
    db: Database, make_study: MakeStudy
) -> None:
    body = external_study("src", n_trials=10)
    del body["direction"]
    body["directions"] = ["maximize", "minimize"]
    record = store.create_study(db, store.parse_definition(body))
    space = definition_of(record).search_space
    # lr 0.01 and 0.02 are the first front, 0.03 the second (better than 0.02 on the first
    # objective alone), 0.04 the third
    for lr, values in ((0.03, [0.7, 0.95]), (0.01, [0.9, 0.9]), (0.04, [0.1, 0.99]), (0.02, [0.6, 0.1])):
        checked = check_params(space, {"lr": lr, "beta1": 0.9, "dropout": 0.1})
        store.add_trial(db, record.optuna_study_id, space, checked, values=values)
    assert warm(db, "w2", top_k=2)["enqueued"] == 2
    assert waiting_lrs(db, "w2") == [0.01, 0.02]  # the first front, in trial order
    assert warm(db, "w3", top_k=3)["enqueued"] == 3
    assert waiting_lrs(db, "w3") == [0.01, 0.02, 0.03]
    assert warm(db, "w9", top_k=9)["enqueued"] == 4
    assert waiting_lrs(db, "w9") == [0.01, 0.02, 0.03, 0.04]


def test_a_pruned_trial_with_a_reported_value_is_neither_best_nor_warm_started(
    db: Database, make_study: MakeStudy
) -> None:
    make_study("src")
    assignment = ask(db, "src", policy=POLICY)
    report(db, "src", assignment.number, 1, 0.99, policy=POLICY)
    tell(db, "src", assignment.number, "pruned")  # Optuna keeps the last reported value
    pruned = db.optuna.get_trial(store.trial_id(db, store.load_record(db, "src"), 0))
    assert (pruned.state, pruned.values) == (TrialState.PRUNED, [0.99])
    with pytest.raises(NotFound):
        best(db, "src")
    assert warm(db, "w")["enqueued"] == 0
    enqueue(db, store.load_record(db, "src"), 0.05, value=0.5)
    assert best(db, "src").number == 1  # type: ignore[union-attr]
    assert warm(db, "w2") == {"from": "src", "enqueued": 1, "skipped": 0, "reasons": []}


def test_the_artifact_folder_may_exist_already(tmp_path: Path) -> None:
    folder = tmp_path / "artifacts"
    store.artifact_store(str(folder))
    store.artifact_store(str(folder))  # a restart of the service
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700


def test_the_queue_filters_by_objective_kind(db: Database, make_study: MakeStudy) -> None:
    record = make_study("ext")
    assert [r.name for r in store.runnable_studies(db, kinds=["external"])] == [record.name]
    assert store.runnable_studies(db, kinds=["builtin", "python"]) == []
    store.forget(db, "never-remembered")  # forgetting an unknown name is no error
    assert store.study_ref(db, "ext").id == record.id


def test_reload_of_a_study_deleted_or_created_again_is_not_found(db: Database, make_study: MakeStudy) -> None:
    old = make_study("s")
    assert store.renew_many(db, [], POLICY) == 0  # no leases named, none renewed
    delete_study(db, "s")
    with pytest.raises(NotFound) as info:
        store.reload(db, old)
    assert (info.value.code, info.value.message) == ("study_not_found", "no study named 's'")
    make_study("s")
    with pytest.raises(NotFound):
        store.reload(db, old)  # the same name, another study


def test_records_that_are_not_an_artifacts_are_left_out(db: Database, make_study: MakeStudy) -> None:
    """Any write token may set system attributes through the Optuna-storage API: an ``artifacts:``
    record that is not an artifact's (found by the scope fuzzer on PostgreSQL: a DELETE of the study
    then answered 500) names no file, and listing, deleting and downloading pass it by."""
    make_study("s")
    number = ask(db, "s", policy=POLICY).number
    record = store.load_record(db, "s")
    study_id = db.optuna.get_study_id_from_name("s")
    trial_id = store.trial_id(db, record, number)
    good = '{"artifact_id": "a1", "filename": "model.pt", "mimetype": "x", "encoding": null}'
    db.optuna.set_study_system_attr(study_id, "artifacts:null", None)
    db.optuna.set_study_system_attr(study_id, "artifacts:list", "[1, 2]")
    db.optuna.set_trial_system_attr(trial_id, "artifacts:text", "not json")
    db.optuna.set_trial_system_attr(trial_id, "artifacts:partial", '{"artifact_id": "a2"}')
    db.optuna.set_trial_system_attr(trial_id, "artifacts:a1", good)
    assert store.artifact_ids(db, record) == ["a1"]
    assert [(m.artifact_id, m.filename) for m in trial_artifacts.list_artifacts(db, "s", number)] == [
        ("a1", "model.pt")
    ]
    delete_study(db, "s")
