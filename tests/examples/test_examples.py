"""The examples run as docs/own-code.md says: a service, a ``caviar worker --allow-code`` started in the
example's folder (no database URL in its environment), and the example's own study file."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import caviar
from caviar import storage
from caviar.service import processes
from caviar.service.processes import CaviarProcess
from tests.conftest import LONG_RUN, DatabaseFactory

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def n_trials(ci: int, long: int) -> int:
    """The study budget: ``ci`` in CI (every asserted property still holds), ``long`` under
    ``make test-long`` (``CAVIAR_TEST_LONG=1``)."""
    return long if LONG_RUN else ci


@pytest.fixture(scope="module")
def service(databases: DatabaseFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[caviar.Client]:
    """One service for the module: each test has its own studies and ends what it leaves behind."""
    tmp_path = tmp_path_factory.mktemp("examples")
    env = {"CAVIAR_HEARTBEAT_INTERVAL_S": "2", "CAVIAR_ARTIFACT_DIR": str(tmp_path / "artifacts")}
    server, url = processes.serve(databases.migrated(), env=env, log=tmp_path / "serve.log")
    with server, caviar.Client(url) as client:
        yield client
    storage.reset_optuna_storages()


@pytest.fixture(autouse=True)
def no_study_left_open(service: caviar.Client) -> Iterator[None]:
    """After each test, stop its unfinished studies: a later test's worker (no --study, as the
    README starts it) must find only its own study's trials."""
    yield
    listed = httpx.get(f"{service.url}/api/v1/studies", params={"limit": 1000}, timeout=30)
    assert listed.status_code == 200, listed.text
    for study in listed.json()["items"]:
        if study["state"] not in ("completed", "failed", "stopped"):
            stopped = httpx.post(f"{service.url}/api/v1/studies/{study['name']}/stop", timeout=30)
            assert stopped.status_code == 200, stopped.text


@pytest.fixture
def worker(service: caviar.Client, tmp_path: Path) -> Iterator[Callable[..., CaviarProcess]]:
    started: list[CaviarProcess] = []

    def start(folder: Path, *args: str) -> CaviarProcess:
        command = ["worker", "--url", service.url, "--gpus", "none", "--poll-interval", "0.2", *args]
        log = tmp_path / f"worker-{len(started)}.log"
        process = CaviarProcess(command, unset=("CAVIAR_DATABASE_URL",), log=log, cwd=folder)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def study_from(folder: str, n_trials: int, **changes: Any) -> dict[str, Any]:
    definition = yaml.safe_load((EXAMPLES / folder / "study.yaml").read_text())
    definition["budget"]["n_trials"] = n_trials
    definition.update(changes)
    return definition


ALLOW = {
    "python_objective": ("--allow-code", "python:model"),
    # as optuna_objective: its child runs caviar.worker._run_fused from the caviar under test
    "fused_python_objective": ("--allow-code", "python:model", "--pass-env", "PYTHONPATH"),
    "command_stdout": ("--allow-code", "command:bash train.sh"),
    "command_sdk": ("--allow-code", "command:python train.py"),
    # children import the caviar under test (a checkout on PYTHONPATH), not an installed one
    "optuna_objective": ("--allow-code", "python:objective", "--pass-env", "PYTHONPATH"),
}
"""What each example's header tells the operator to allow (and nothing more)."""


def run_to_the_end(
    client: caviar.Client, start: Callable[..., CaviarProcess], folder: str, n_trials: int, **changes: Any
) -> caviar.Study:
    study = client.create_study(study_from(folder, n_trials, **changes))
    process = start(EXAMPLES / folder, *ALLOW[folder], "--cpu", "2", "--exit-when-idle", "2")
    assert process.wait(300) == 0, process.output()
    info = study.info()
    assert info["state"] == "completed", (info, study.trials(), process.output())
    counts = info["trial_counts"]
    assert counts["complete"] + counts["pruned"] == n_trials and counts["fail"] == 0, counts
    return study


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


def test_a_training_script_reporting_with_the_sdk(service: caviar.Client, worker: Any) -> None:
    study = run_to_the_end(service, worker, "command_sdk", n_trials(2, 6))
    trials = study.trials()
    assert all(len(t["intermediate_values"]) >= 1 for t in trials)
    log = study.download(trials[0]["number"], "trial.log").decode()
    assert "epoch 0: train loss" in log  # the script's own output, kept as the trial's log
    assert study.best()["value"] < 0.2


def test_a_non_python_program_reporting_on_stdout(service: caviar.Client, worker: Any) -> None:
    study = run_to_the_end(service, worker, "command_stdout", n_trials(4, 8))
    trials = study.trials()
    complete = [t for t in trials if t["state"] == "complete"]
    assert complete and all(len(t["intermediate_values"]) == 10 for t in complete)
    log = study.download(complete[0]["number"], "trial.log").decode()
    assert "caviar-report step=9" in log and "epoch 9 loss" in log


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
