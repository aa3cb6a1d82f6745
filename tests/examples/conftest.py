"""The examples' shared parts: one service per test module (each test has its own studies and ends
what it leaves behind), ``caviar worker --allow-code`` started in an example's folder (no
database URL in its environment), and the example's own study file.

The examples are spread over two modules so that pytest-xdist, which keeps a module on one
process, can run them side by side.
"""

from __future__ import annotations

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
