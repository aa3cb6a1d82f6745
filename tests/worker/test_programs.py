"""User code run by workers (``kind: python`` / ``kind: command``) under faults: a killed child, a
stopping worker, a restarted API, code that cannot be imported or found."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import caviar
from caviar import storage
from caviar.service import processes
from caviar.service.processes import CaviarProcess, wait_until
from tests.conftest import DatabaseFactory

pytestmark = pytest.mark.slow

# A training script: reports 5 steps (sleeping EPOCH_S between; each report is first noted in the
# file "reports" for the test), writes its PID for the test, and
# fails on purpose when told to (FAIL_ONCE: only its first attempt, so the retry succeeds).
SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import caviar

    trial = caviar.current_trial()
    pids = os.environ["PID_DIR"]
    attempt = "retry" if trial.retry_of is not None else "first"
    with open(os.path.join(pids, f"{trial.number}-{attempt}"), "w") as handle:
        handle.write(str(os.getpid()))
    for step in range(5):
        time.sleep(float(os.environ.get("EPOCH_S", "0.2")))
        with open(os.path.join(pids, "reports"), "a") as handle:
            handle.write(f"{trial.number} {step}\\n")
        trial.report(trial.params["x"] * step, step)
    print("done", flush=True)
    trial.tell(trial.params["x"])
    """
)


def program_study(
    name: str, tmp: Path, *, n_trials: int, epoch_s: float = 0.2, **budget: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "direction": "maximize",
        "search_space": {"x": {"type": "float", "low": 0.0, "high": 1.0}},
        "objective": {
            "kind": "command",
            "command": ["python", "train.py"],
            "env": {"PID_DIR": str(tmp / "pids"), "EPOCH_S": str(epoch_s)},
            "timeout_s": 120,
        },
        "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "none"},
        "budget": {"n_trials": n_trials, "max_parallel": 4, **budget},
    }


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "train.py").write_text(SCRIPT)
    (folder / "objectives.py").write_text("def good(trial):\n    return trial.params['x']\n")
    (tmp_path / "pids").mkdir()
    return folder


def serve_api(db_url: str, folder: Path, port: int = 0, heartbeat: float = 1.0) -> tuple[CaviarProcess, str]:
    env = {"CAVIAR_HEARTBEAT_INTERVAL_S": str(heartbeat), "CAVIAR_ARTIFACT_DIR": str(folder / "artifacts")}
    return processes.serve(db_url, port=port, env=env, log=folder / "serve.log")


@pytest.fixture(scope="module")
def shared_api(
    databases: DatabaseFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[CaviarProcess, str]]:
    """One API (heartbeat 1 s) for the tests that need no server of their own: each uses its own
    studies, and :func:`api` stops what a test leaves unfinished."""
    server, url = serve_api(databases.migrated(), tmp_path_factory.mktemp("programs"))
    yield server, url
    server.stop()
    storage.reset_optuna_storages()


@pytest.fixture
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., tuple[CaviarProcess, str]]]:
    """``api()``: the module's shared API; ``api(port=..., heartbeat=...)`` other than the default:
    a server of this test's own (on its own database), stopped after it."""
    started: list[CaviarProcess] = []
    shared: list[str] = []

    def start(port: int = 0, heartbeat: float = 1.0) -> tuple[CaviarProcess, str]:
        if port == 0 and heartbeat == 1.0:
            server, url = request.getfixturevalue("shared_api")
            shared.append(url)
            return server, url
        server, url = serve_api(request.getfixturevalue("db_url"), tmp_path, port, heartbeat)
        started.append(server)
        return server, url

    yield start
    for server in started:
        server.stop()
    for url in shared:  # a later test's worker (no --study) must find only its own studies' trials
        listed = httpx.get(f"{url}/api/v1/studies", params={"limit": 1000}, timeout=30)
        assert listed.status_code == 200, listed.text
        for study in listed.json()["items"]:
            if study["state"] not in ("completed", "failed", "stopped"):
                stopped = httpx.post(f"{url}/api/v1/studies/{study['name']}/stop", timeout=30)
                assert stopped.status_code == 200, stopped.text


def start_worker(url: str, folder: Path, tmp: Path, *args: str) -> CaviarProcess:
    command = [
        "worker",
        "--url",
        url,
        "--gpus",
        "none",
        "--poll-interval",
        "0.2",
        "--allow-code",
        "all",
        "--pass-env",
        "PYTHONPATH",  # children import the caviar under test, not an installed one
        *args,
    ]
    return CaviarProcess(
        command, unset=("CAVIAR_DATABASE_URL",), log=tmp / f"worker-{time.monotonic_ns()}.log", cwd=folder
    )


def pid_of(tmp: Path, number: int, attempt: str = "first") -> int | None:
    path = tmp / "pids" / f"{number}-{attempt}"
    return int(path.read_text()) if path.exists() and path.read_text() else None


def reports_tried(tmp: Path) -> int:
    """How many reports the training scripts have started to send."""
    path = tmp / "pids" / "reports"
    return len(path.read_text().splitlines()) if path.exists() else 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.one_database
def test_a_killed_child_fails_its_trial_and_the_retry_runs_with_the_same_params(
    api: Any, code_dir: Path, tmp_path: Path
) -> None:
    _, url = api()
    with caviar.Client(url) as client:
        study = client.create_study(program_study("kill", tmp_path, n_trials=2, epoch_s=0.4))
        worker = start_worker(url, code_dir, tmp_path, "--cpu", "1", "--exit-when-idle", "2")
        wait_until(lambda: pid_of(tmp_path, 0) is not None, 60, "the child did not start")
        os.kill(pid_of(tmp_path, 0), signal.SIGKILL)  # type: ignore[arg-type]
        assert worker.wait(180) == 0, worker.output()
        trials = {t["number"]: t for t in study.trials()}
    killed = trials[0]
    assert killed["state"] == "fail" and "killed by signal 9" in killed["fail_reason"]
    (retry,) = [t for t in trials.values() if t["retry_of"] == 0]
    assert retry["state"] == "complete" and retry["params"] == killed["params"]
    assert sum(t["state"] == "complete" for t in trials.values()) == 2


@pytest.mark.one_database
def test_sigterm_of_the_worker_hands_the_running_trial_back_and_stops_the_child(
    api: Any, code_dir: Path, tmp_path: Path
) -> None:
    _, url = api()
    with caviar.Client(url) as client:
        study = client.create_study(program_study("term", tmp_path, n_trials=1, epoch_s=30.0))
        worker = start_worker(url, code_dir, tmp_path, "--cpu", "1")
        wait_until(lambda: pid_of(tmp_path, 0) is not None, 60, "the child did not start")
        child = pid_of(tmp_path, 0)
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.output()
        assert child is not None and not alive(child)
        trials = study.trials()
    handed_back = trials[0]
    assert handed_back["state"] == "fail" and "handed back" in handed_back["fail_reason"]
    assert [(t["state"], t["retry_of"], t["params"]) for t in trials[1:]] == [
        ("waiting", 0, handed_back["params"])
    ]


def test_the_api_restarted_mid_trial_loses_and_duplicates_nothing(
    api: Any, code_dir: Path, tmp_path: Path
) -> None:
    server, url = api(heartbeat=5.0)
    port = int(url.rsplit(":", 1)[1])
    with caviar.Client(url) as client:
        study = client.create_study(program_study("restart", tmp_path, n_trials=4, epoch_s=0.6))
        worker = start_worker(url, code_dir, tmp_path, "--cpu", "2", "--exit-when-idle", "3")
        wait_until(lambda: pid_of(tmp_path, 0) is not None, 60, "no trial started")
        server.stop()
        before = reports_tried(tmp_path)
        # a trial reports into the void: the SDK and the worker back off and retry
        wait_until(lambda: reports_tried(tmp_path) > before, 60, "no report tried while the API was down")
        api(port=port, heartbeat=5.0)
        assert worker.wait(180) == 0, worker.output()
        trials = study.trials()
        info = study.info()
    assert info["state"] == "completed", info
    assert [t["state"] for t in trials] == ["complete"] * 4, trials  # nothing lost, nothing retried
    assert all(len(t["intermediate_values"]) == 5 for t in trials)


@pytest.mark.one_database
def test_code_that_cannot_run_fails_its_trial_with_the_reason(
    api: Any, code_dir: Path, tmp_path: Path
) -> None:
    _, url = api()
    with caviar.Client(url) as client:
        missing = program_study("no-command", tmp_path, n_trials=1, max_retries=0, max_failed_trials=0)
        missing["objective"]["command"] = ["surely-not-installed-caviar-cmd", "{x}"]
        client.create_study(missing)
        bad_import = program_study("no-module", tmp_path, n_trials=1, max_retries=0, max_failed_trials=0)
        bad_import["objective"] = {"kind": "python", "entrypoint": "not_a_module:objective"}
        client.create_study(bad_import)
        good = program_study("good", tmp_path, n_trials=2)
        good["objective"] = {"kind": "python", "entrypoint": "objectives:good"}
        client.create_study(good)
        worker = start_worker(url, code_dir, tmp_path, "--cpu", "1", "--exit-when-idle", "2")
        assert worker.wait(120) == 0, worker.output()
        (not_found,) = client.study("no-command").trials()  # a setup error: the study paused at once
        (not_imported,) = client.study("no-module").trials()
        assert client.study("no-module").info()["state"] == "failed"  # max_failed_trials 0
        good_trials = client.study("good").trials()
    assert (
        not_found["state"] == "fail" and "setup error: cannot start the command" in not_found["fail_reason"]
    )
    assert not_imported["state"] == "fail" and "No module named 'not_a_module'" in not_imported["fail_reason"]
    assert [t["state"] for t in good_trials] == ["complete", "complete"]
    assert all(t["value"] == t["params"]["x"] for t in good_trials)
