"""The examples that are scripts using caviar's client: a training script reporting with the SDK,
an external loop with ``study.optimize``, an unmodified Optuna objective (run as docs/own-code.md
says; fixtures in ``conftest.py``)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import caviar
from tests.examples.conftest import EXAMPLES, n_trials, run_to_the_end

pytestmark = pytest.mark.slow


def test_a_training_script_reporting_with_the_sdk(service: caviar.Client, worker: Any) -> None:
    study = run_to_the_end(service, worker, "command_sdk", n_trials(2, 6))
    trials = study.trials()
    assert all(len(t["intermediate_values"]) >= 1 for t in trials)
    log = study.download(trials[0]["number"], "trial.log").decode()
    assert "epoch 0: train loss" in log  # the script's own output, kept as the trial's log
    assert study.best()["value"] < 0.2


def test_an_external_loop_with_study_optimize(service: caviar.Client) -> None:
    script = EXAMPLES / "client_optimize.py"
    result = subprocess.run(
        [sys.executable, str(script), "--url", service.url, "--name", "ext", "--n-jobs", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "this run finished 16 trials" in result.stdout
    info = service.study("ext").info()
    assert info["state"] == "completed" and info["best"]["value"] >= 0.9


def test_an_unmodified_optuna_objective_on_workers_and_through_the_client(
    service: caviar.Client, worker: Any
) -> None:
    study = run_to_the_end(service, worker, "optuna_objective", 6)  # kind: python on a worker
    for trial in study.trials():  # define-by-run: as many n_units_l{i} as n_layers says
        params = trial["params"]
        assert sum(name.startswith("n_units_l") for name in params) == params["n_layers"], params
    assert study.best()["value"] >= 0.9
    script = EXAMPLES / "optuna_objective" / "objective.py"
    result = subprocess.run(
        [sys.executable, str(script), "--url", service.url, "--name", "via-client", "--n-trials", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "this run finished 4 trials" in result.stdout
    counts = service.study("via-client").info()["trial_counts"]
    assert counts["complete"] + counts["pruned"] == 4 and counts["fail"] == 0, counts
