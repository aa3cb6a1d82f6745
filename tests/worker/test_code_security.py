"""A worker runs only the code its operator allowed, in a clean environment, with a credential for
one trial; ``--study`` pins the study it was started for (real service and worker processes)."""

from __future__ import annotations

import json
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import caviar
from caviar.service import processes
from caviar.service.processes import CaviarProcess, wait_until

pytestmark = pytest.mark.slow

ADMIN = "admin-" + "c0degov-" * 4
LEAK = "leak-me-not-7f3a"

PROBE = textwrap.dedent(
    """
    import json, os
    import httpx
    import caviar

    trial = caviar.current_trial()
    url, token = os.environ["CAVIAR_URL"], os.environ.get("CAVIAR_API_TOKEN", "")
    headers = {"Authorization": f"Bearer {token}"}
    api = f"{url}/api/v1"
    statuses = {
        "other_trial": httpx.post(f"{api}/studies/{trial.study}/trials/{trial.number + 1}/tell",
                                  json={"state": "complete", "value": 1e9}, headers=headers).status_code,
        "create_study": httpx.post(f"{api}/studies", json={"name": "made-by-child"}, headers=headers).status_code,
        "read_studies": httpx.get(f"{api}/studies", headers=headers).status_code,
    }
    trial.report(0.25, 0)  # its own trial: allowed
    with open(os.path.join(os.environ["OUT_DIR"], "probe.json"), "w") as handle:
        json.dump({"env": dict(os.environ), "statuses": statuses}, handle)
    print("environment:", json.dumps(dict(os.environ)), flush=True)  # lands in trial.log
    trial.tell(0.25)
    """
)


def command_study(name: str, command: list[str], *, n_trials: int = 1, **objective: Any) -> dict[str, Any]:
    return {
        "name": name,
        "direction": "maximize",
        "search_space": {"x": {"type": "float", "low": 0.0, "high": 1.0}},
        "objective": {"kind": "command", "command": command, "timeout_s": 120, **objective},
        "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "none"},
        "budget": {"n_trials": n_trials, "max_retries": 0, "max_failed_trials": 0},
    }


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "train.py").write_text("print('caviar-result value=0.5')\n")
    (folder / "probe.py").write_text(PROBE)
    (folder / "objectives.py").write_text("def good(trial):\n    return trial.params['x']\n")
    (folder / "evilmod.py").write_text(
        f"import pathlib\ndef run(trial):\n    pathlib.Path({str(tmp_path / 'marker-py')!r}).touch()\n    return 1.0\n"
    )
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(tmp_path / 'marker-pin')!r}).touch()\n"
    )
    return folder


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Iterator[Callable[..., str]]:
    started: list[CaviarProcess] = []

    def start(**env: str) -> str:
        env = {"CAVIAR_HEARTBEAT_INTERVAL_S": "1", "CAVIAR_ARTIFACT_DIR": str(tmp_path / "artifacts"), **env}
        server, url = processes.serve(db_url, env=env, log=tmp_path / "serve.log")
        started.append(server)
        return url

    yield start
    for server in started:
        server.stop()


def start_worker(
    url: str, folder: Path, tmp: Path, *args: str, env: dict[str, str] | None = None
) -> CaviarProcess:
    command = ["worker", "--url", url, "--gpus", "none", "--cpu", "1", "--poll-interval", "0.2", *args]
    return CaviarProcess(
        command,
        env=env,
        unset=("CAVIAR_DATABASE_URL", "CAVIAR_API_TOKEN"),
        log=tmp / f"worker-{time.monotonic_ns()}.log",
        cwd=folder,
    )


def test_code_not_on_the_allow_list_is_refused_on_the_study_and_never_runs(
    api: Any, code_dir: Path, tmp_path: Path
) -> None:
    url = api()
    with caviar.Client(url) as client:
        client.create_study(command_study("evil-sh", ["sh", "-c", f"touch {tmp_path / 'marker-sh'}"]))
        client.create_study(command_study("evil-abs", ["/bin/sh", "-c", f"touch {tmp_path / 'marker-abs'}"]))
        client.create_study(command_study("evil-script", ["python", "evil.py"]))
        evil_py = command_study("evil-py", [])
        evil_py["objective"] = {"kind": "python", "entrypoint": "evilmod:run"}
        client.create_study(evil_py)
        good = command_study("good", ["python", "train.py"])
        client.create_study(good)
        good_py = command_study("good-py", [])
        good_py["objective"] = {"kind": "python", "entrypoint": "objectives:good"}
        client.create_study(good_py)
        worker = start_worker(
            url,
            code_dir,
            tmp_path,
            "--allow-code",
            "command:python train.py",
            "--allow-code",
            "python:objectives",
            "--exit-when-idle",
            "3",
        )
        assert worker.wait(120) == 0, worker.output()
        for name in ("good", "good-py"):
            assert client.study(name).info()["state"] == "completed", worker.output()
        refused = {name: client.study(name) for name in ("evil-sh", "evil-abs", "evil-script", "evil-py")}
        for name, study in refused.items():
            trials = study.trials()
            first = trials[0]
            assert first["state"] == "fail", (name, trials)
            assert "refused by worker" in first["fail_reason"], first
            assert "not on this worker's allow-list" in first["fail_reason"], first
            # handed back: no retry used up, no failure counted, the study waits for an allowed worker
            assert [(t["state"], t["retry_of"]) for t in trials[1:]] == [("waiting", first["number"])], trials
            assert study.info()["state"] not in ("failed", "completed"), name
    assert not any((tmp_path / m).exists() for m in ("marker-sh", "marker-abs", "marker-pin", "marker-py"))
    assert "refusing study evil-sh" in worker.output()


def test_the_child_gets_a_clean_environment_and_a_credential_for_its_trial_only(
    api: Any, code_dir: Path, tmp_path: Path
) -> None:
    url = api(CAVIAR_API_TOKEN=ADMIN)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    made = httpx.post(f"{url}/api/v1/tokens", json={"scope": "worker"}, headers=admin)
    worker_token = made.json()["token"]
    with caviar.Client(url, ADMIN) as client:
        study = client.create_study(
            command_study("probe", ["python", "probe.py"], env={"OUT_DIR": str(tmp_path)})
        )
        env = {"CAVIAR_API_TOKEN": worker_token, "MY_TEST_SECRET": LEAK, "PASSED_VAR": "passed-ok"}
        worker = start_worker(
            url,
            code_dir,
            tmp_path,
            "--allow-code",
            "command:python",
            "--pass-env",
            "PASSED_VAR",
            "--pass-env",
            "PYTHONPATH",
            "--exit-when-idle",
            "2",
            env=env,
        )
        assert worker.wait(120) == 0, worker.output()
        (trial,) = study.trials()
        assert trial["state"] == "complete", (trial, worker.output())
        log = study.download(trial["number"], "trial.log").decode()
        # every heartbeat proved the slot's registration (with its credential): none was refused,
        # and the last one, "stopped", was recorded
        (slot,) = client.workers()["items"]
        assert slot["status"] == "stopped", slot
        assert "heartbeat failed" not in worker.output() and "not_your_worker" not in worker.output()
    probe = json.loads((tmp_path / "probe.json").read_text())
    child = probe["env"]
    assert child["CAVIAR_API_TOKEN"].startswith("cvt_")
    assert not any(worker_token in value for value in child.values())
    assert "MY_TEST_SECRET" not in child and not any(LEAK in value for value in child.values())
    assert child["PASSED_VAR"] == "passed-ok" and child["OUT_DIR"] == str(tmp_path)
    assert {k for k in child if k.startswith("CAVIAR_")} == {
        "CAVIAR_TRIAL",
        "CAVIAR_TRIAL_DIR",
        "CAVIAR_URL",
        "CAVIAR_API_TOKEN",
    }
    assert probe["statuses"] == {"other_trial": 403, "create_study": 403, "read_studies": 403}
    assert "passed-ok" in log  # the log holds the child's environment...
    assert worker_token not in log and LEAK not in log  # ...and nothing the child did not get
    # the trial ended: its credential is dead
    ended = httpx.post(
        f"{url}/api/v1/studies/probe/trials/{trial['number']}/heartbeat",
        json={},
        headers={"Authorization": f"Bearer {child['CAVIAR_API_TOKEN']}"},
    )
    assert ended.status_code == 409, ended.text


def test_a_pinned_worker_refuses_a_study_recreated_under_its_name(
    api: Any, code_dir: Path, tmp_path: Path
) -> None:
    url = api()
    with caviar.Client(url) as client:
        study = client.create_study(command_study("pinned", ["python", "train.py"]))
        worker = start_worker(url, code_dir, tmp_path, "--study", "pinned", "--allow-code", "command:python")
        try:
            wait_until(lambda: study.info()["state"] == "completed", 60, "the pinned study did not run")
            assert httpx.delete(f"{url}/api/v1/studies/pinned").status_code == 204
            recreated = client.create_study(command_study("pinned", ["python", "evil.py"]))

            def refused() -> bool:
                trials = recreated.trials()
                return bool(trials) and "refused by worker" in (trials[0]["fail_reason"] or "")

            try:
                wait_until(refused, 60, "the recreated study was not refused")
            except TimeoutError:  # say what happened instead (trials, and the worker's own account)
                pytest.fail(f"not refused: {recreated.trials()}\n{worker.output()}")
            reason = recreated.trials()[0]["fail_reason"]
        finally:
            worker.signal(signal.SIGTERM)
            code = worker.wait(30)
    assert code == 0, worker.output()
    assert "deleted and created again" in reason and "restart the worker" in reason
    assert not (tmp_path / "marker-pin").exists()
    assert "pinned" in worker.output() and "restart the worker" in worker.output()
