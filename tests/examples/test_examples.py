"""The examples run as docs/own-code.md says: a service, a ``caviar worker --allow-code`` started in the
example's folder (no database URL in its environment), and the example's own study file.

The own PyTorch model and programs printing their reports (fixtures in ``conftest.py``); the
scripts using the client and Optuna objectives are in ``test_examples_scripts.py``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

import caviar
from tests.examples.conftest import ALLOW, EXAMPLES, n_trials, run_to_the_end, study_from

pytestmark = pytest.mark.slow


def test_a_python_function_your_own_pytorch_model(service: caviar.Client, worker: Any) -> None:
    study = run_to_the_end(service, worker, "python_objective", n_trials(2, 6))
    best = study.best()
    assert best["value"] >= 0.85, best
    files = {a["filename"] for a in study.artifacts(best["number"])}
    assert files == {"model.pt", "trial.log"}
    import torch

    state = torch.load(
        __import__("io").BytesIO(study.download(best["number"], "model.pt")), weights_only=True
    )
    assert state["layers.0.weight"].shape[1] == 13


def test_a_non_python_program_reporting_on_stdout(service: caviar.Client, worker: Any) -> None:
    study = run_to_the_end(service, worker, "command_stdout", n_trials(4, 8))
    trials = study.trials()
    complete = [t for t in trials if t["state"] == "complete"]
    assert complete and all(len(t["intermediate_values"]) == 10 for t in complete)
    log = study.download(complete[0]["number"], "trial.log").decode()
    assert "caviar-report step=9" in log and "epoch 9 loss" in log


def test_a_prune_decision_stops_a_printing_program(service: caviar.Client, worker: Any) -> None:
    definition = study_from("command_stdout", 2, name="prune-now")
    definition["objective"]["command"] = ["bash", "train.sh", "{lr}", "{decay}", "60"]
    definition["objective"]["env"] = {"EXAMPLE_EPOCH_S": "1"}
    definition["pruner"] = {"type": "threshold", "options": {"upper": 0.0}}  # every report is above 0
    study = service.create_study(definition)
    started = time.monotonic()
    process = worker(
        EXAMPLES / "command_stdout", *ALLOW["command_stdout"], "--cpu", "1", "--exit-when-idle", "1"
    )
    assert process.wait(120) == 0, process.output()
    assert time.monotonic() - started < 45  # 60 epochs of 1 s each were cut short
    trials = study.trials()
    assert [t["state"] for t in trials] == ["pruned", "pruned"]
    assert all(len(t["intermediate_values"]) <= 2 for t in trials)


def test_a_worker_without_allow_code_refuses_and_says_why(service: caviar.Client, worker: Any) -> None:
    study = service.create_study(study_from("command_stdout", 2, name="no-code"))
    process = worker(EXAMPLES / "command_stdout", "--cpu", "1", "--study", "no-code", "--exit-when-idle", "1")
    assert process.wait(60) == 0
    assert "start the worker with --allow-code" in process.output()
    assert study.info()["trial_counts"]["running"] == 0 and study.info()["state"] == "queued"


def test_your_own_pytorch_model_k_trials_trained_as_one(service: caviar.Client, worker: Any) -> None:
    # two start-up trials (in groups of one), then groups of up to 4: two rounds of the 2 slots
    sampler = {"type": "tpe", "seed": 0, "options": {"n_startup_trials": 2}}
    study = run_to_the_end(service, worker, "fused_python_objective", n_trials(6, 20), sampler=sampler)
    trials = study.trials()
    groups = {t["user_attrs"]["fused_with"] for t in trials}
    fused = [g for g in groups if "," in g]
    assert fused, groups  # after the sampler's start-up trials, trials ran in groups
    for group in fused:  # each member of a group shares the architecture and has its own lr
        members = [t for t in trials if t["user_attrs"]["fused_with"] == group]
        assert len({(t["params"]["hidden"], t["params"]["dropout"]) for t in members}) == 1, members
        assert len({t["params"]["lr"] for t in members}) == len(members), members
    assert all(len(t["intermediate_values"]) >= 1 for t in trials)
    best = study.best()
    assert best["value"] >= 0.85, best
    import torch

    state = torch.load(
        __import__("io").BytesIO(study.download(best["number"], "model.pt")), weights_only=True
    )
    assert state["layers.0.weight"].shape == (best["params"]["hidden"], 13)
