"""A program that cannot start pauses its study after one trial (a setup error); each trial runs in
a directory of its own, and the files its objective's ``outputs`` name come back as its artifacts."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import caviar
from caviar.cli import app
from caviar.service.definition import StudyDefinition
from caviar.worker._program import resolve_code_paths, setup_error
from caviar.worker._run_python import SETUP_ERROR_EXIT
from tests.worker.test_programs import api, code_dir, program_study, shared_api, start_worker

__all__ = ["api", "code_dir", "shared_api"]  # fixtures used here

# Writes checkpoint.pt and a plot in its own directory, waits (with a deadline) until the other
# trial has started too, so both run at once; trial 1 then fails on purpose: its files still count.
CHECKPOINTS = textwrap.dedent(
    """
    import os, pathlib, sys, time
    import caviar

    trial = caviar.current_trial()
    here = pathlib.Path.cwd()
    assert str(here) == os.environ["CAVIAR_TRIAL_DIR"], (here, os.environ["CAVIAR_TRIAL_DIR"])
    marks = pathlib.Path(os.environ["PID_DIR"])
    (marks / f"started-{trial.number}").write_text(str(here))
    (here / "checkpoint.pt").write_text(f"weights of trial {trial.number}")
    (here / "curve.png").write_bytes(b"png" * (trial.number + 1))
    (here / "scratch.tmp").write_text("not an output")
    deadline = time.monotonic() + 60
    while len(list(marks.glob("started-*"))) < int(os.environ["TOGETHER"]):
        if time.monotonic() > deadline:
            sys.exit("the other trial never started")
        time.sleep(0.05)
    if trial.number == 1:
        sys.exit("trial 1 fails on purpose")
    trial.tell(trial.params["x"])
    """
)


def _show(url: str, name: str) -> str:
    result = CliRunner().invoke(app, ["study", "show", name], env={"CAVIAR_URL": url})
    assert result.exit_code == 0, result.output
    return result.output


def _paused_after_one(url: str, name: str, worker_output: str, reason: str) -> dict[str, Any]:
    with caviar.Client(url) as client:
        info = client.study(name).info()
        trials = client.study(name).trials()
    assert [t["state"] for t in trials] == ["fail"], trials  # exactly one: not retried, not repeated
    assert trials[0]["fail_reason"].startswith("setup error: "), trials[0]["fail_reason"]
    assert reason in trials[0]["fail_reason"], trials[0]["fail_reason"]
    assert info["state"] == "paused", info
    assert info["stop_reason"].startswith("paused: setup error: "), info
    assert worker_output.count(f"of {name}: setup error: ") == 1, worker_output
    assert "setup error: " in _show(url, name)
    return trials[0]


def _study(name: str, tmp: Path, command: list[str], **objective: Any) -> dict[str, Any]:
    body = program_study(name, tmp, n_trials=4, max_retries=2, max_failed_trials=10)
    body["objective"]["command"] = command
    body["objective"].update(objective)
    return body


@pytest.mark.slow
def test_a_missing_program_or_script_pauses_its_study_after_one_trial(
    api: Any, code_dir: Path, tmp_path: Path
) -> None:
    _, url = api()
    with caviar.Client(url) as client:
        client.create_study(_study("no-program", tmp_path, ["surely-not-installed-caviar-cmd", "{x}"]))
        client.create_study(_study("misspelt", tmp_path, ["python", "trian.py"]))
        # the interpreter itself finds no script (started through a shell): exit 2, "can't open file"
        client.create_study(_study("misspelt-in-shell", tmp_path, ["sh", "-c", "exec python trian.py"]))
        worker = start_worker(url, code_dir, tmp_path, "--cpu", "1", "--exit-when-idle", "2")
        assert worker.wait(120) == 0, worker.output()
    output = worker.output(100_000)
    _paused_after_one(url, "no-program", output, "surely-not-installed-caviar-cmd")
    _paused_after_one(url, "misspelt", output, f"no script {code_dir / 'trian.py'}")
    _paused_after_one(url, "misspelt-in-shell", output, "can't open file")

    (code_dir / "trian.py").write_text((code_dir / "train.py").read_text())  # the fix
    with caviar.Client(url) as client:
        resumed = client.study("misspelt").resume()
        assert resumed["state"] in ("queued", "running") and resumed["stop_reason"] is None, resumed
        worker = start_worker(url, code_dir, tmp_path, "--cpu", "1", "--exit-when-idle", "2")
        assert worker.wait(240) == 0, worker.output()
        info = client.study("misspelt").info()
        states = [t["state"] for t in client.study("misspelt").trials()]
    assert info["state"] == "completed" and info["stop_reason"] is None, info
    assert states == ["fail"] + ["complete"] * 4, states


@pytest.mark.slow
def test_an_entrypoint_that_cannot_be_loaded_pauses_its_study_after_one_trial(
    api: Any, code_dir: Path, tmp_path: Path
) -> None:
    _, url = api()
    (code_dir / "broken.py").write_text("import surely_not_a_module_of_caviar\n")
    with caviar.Client(url) as client:
        for name, entrypoint in [
            ("no-module", "not_a_module:objective"),
            ("import-fails", "broken:objective"),
            ("no-function", "objectives:missing"),
        ]:
            body = program_study(name, tmp_path, n_trials=3, max_retries=2, max_failed_trials=10)
            body["objective"] = {"kind": "python", "entrypoint": entrypoint}
            client.create_study(body)
        worker = start_worker(url, code_dir, tmp_path, "--cpu", "1", "--exit-when-idle", "2")
        assert worker.wait(120) == 0, worker.output()
    output = worker.output(100_000)
    _paused_after_one(url, "no-module", output, "No module named 'not_a_module'")
    _paused_after_one(url, "import-fails", output, "surely_not_a_module_of_caviar")
    _paused_after_one(url, "no-function", output, "no function 'missing'")

    (code_dir / "broken.py").write_text("def objective(trial):\n    return trial.params['x']\n")  # the fix
    with caviar.Client(url) as client:
        client.study("import-fails").resume()
        worker = start_worker(url, code_dir, tmp_path, "--cpu", "1", "--exit-when-idle", "2")
        assert worker.wait(120) == 0, worker.output()
        states = [t["state"] for t in client.study("import-fails").trials()]
    assert states == ["fail", "complete", "complete", "complete"], states


@pytest.mark.slow
def test_concurrent_trials_write_their_own_checkpoints_and_each_comes_back_as_its_trials(
    api: Any, code_dir: Path, tmp_path: Path
) -> None:
    _, url = api()
    (code_dir / "checkpoints.py").write_text(CHECKPOINTS)
    workdir = tmp_path / "work"
    body = program_study("checkpoints", tmp_path, n_trials=2, max_retries=0, max_failed_trials=5)
    body["objective"]["command"] = ["python", "checkpoints.py"]
    body["objective"]["env"]["TOGETHER"] = "2"
    body["objective"]["outputs"] = ["checkpoint.pt", "*.png", "missing/*.bin"]
    with caviar.Client(url) as client:
        client.create_study(body)
        worker = start_worker(
            url, code_dir, tmp_path, "--cpu", "2", "--exit-when-idle", "2", "--workdir", str(workdir)
        )
        assert worker.wait(120) == 0, worker.output()
        study = client.study("checkpoints")
        trials = study.trials()
        numbers = [t["number"] for t in trials]
        names = {n: sorted(a["filename"] for a in study.artifacts(n)) for n in numbers}
        files = {n: study.download(n, "checkpoint.pt") for n in numbers}
        plots = {n: study.download(n, "curve.png") for n in numbers}
        best, filename, weights = study.checkpoint()
        served = httpx.get(f"{url}/api/v1/studies/checkpoints/checkpoint", timeout=30)
    # the failed trial is not retried (max_retries 0) but does not use up n_trials: a third one runs
    states = {t["number"]: t["state"] for t in trials}
    assert states == {0: "complete", 1: "fail", 2: "complete"}, states
    assert names == {n: ["checkpoint.pt", "curve.png", "trial.log"] for n in numbers}, names  # any state
    assert files == {n: f"weights of trial {n}".encode() for n in numbers}
    assert plots == {n: b"png" * (n + 1) for n in numbers}
    expected = max((t for t in trials if t["state"] == "complete"), key=lambda t: t["value"])["number"]
    assert (best, filename, weights) == (expected, "checkpoint.pt", files[expected])
    assert served.status_code == 200 and served.content == files[expected]
    dirs = {(tmp_path / "pids" / f"started-{n}").read_text() for n in (0, 1)}
    assert len(dirs) == 2 and all(Path(d).parent == workdir for d in dirs), dirs
    assert list(workdir.iterdir()) == []  # removed after each trial


@pytest.mark.slow
def test_keep_trial_dirs_leaves_each_trials_directory(api: Any, code_dir: Path, tmp_path: Path) -> None:
    _, url = api()
    (code_dir / "checkpoints.py").write_text(CHECKPOINTS)
    workdir = tmp_path / "kept"
    body = program_study("kept", tmp_path, n_trials=1)
    body["objective"]["command"] = ["python", "checkpoints.py"]
    body["objective"]["env"]["TOGETHER"] = "1"
    with caviar.Client(url) as client:
        client.create_study(body)
        worker = start_worker(
            url,
            code_dir,
            tmp_path,
            "--cpu",
            "1",
            "--exit-when-idle",
            "2",
            "--workdir",
            str(workdir),
            "--keep-trial-dirs",
        )
        assert worker.wait(120) == 0, worker.output()
        names = [a["filename"] for a in client.study("kept").artifacts(0)]
    assert names == ["trial.log"]  # no outputs declared: nothing else is stored
    (kept,) = workdir.iterdir()
    assert (kept / "checkpoint.pt").read_text() == "weights of trial 0"
    assert not (code_dir / "checkpoint.pt").exists()  # not in the worker's directory any more


def test_a_command_finds_its_program_and_script_in_the_code_directory(tmp_path: Path) -> None:
    code = tmp_path / "code"
    assert resolve_code_paths(["python", "train.py", "--out", "ckpt.pt"], code) == (
        ["python", str(code / "train.py"), "--out", "ckpt.pt"],
        code / "train.py",
    )
    assert resolve_code_paths(["python3.11", "-u", "-W", "ignore", "sub/t.py", "x"], code) == (
        ["python3.11", "-u", "-W", "ignore", str(code / "sub/t.py"), "x"],
        code / "sub/t.py",
    )
    assert resolve_code_paths(["/usr/bin/python3", "/abs/t.py"], code) == (
        ["/usr/bin/python3", "/abs/t.py"],
        Path("/abs/t.py"),
    )
    assert resolve_code_paths(["python", "-m", "pkg.train", "a.py"], code) == (
        ["python", "-m", "pkg.train", "a.py"],
        None,
    )
    assert resolve_code_paths(["./train.sh", "out.txt"], code) == ([str(code / "train.sh"), "out.txt"], None)
    assert resolve_code_paths(["train", "data.csv"], code) == (["train", "data.csv"], None)  # on PATH


def test_another_interpreters_script_is_found_in_the_code_directory(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.sh").write_text("echo hi\n")
    assert resolve_code_paths(["bash", "-e", "train.sh", "out.txt"], code) == (
        ["bash", "-e", str(code / "train.sh"), "out.txt"],
        None,
    )
    # only a file that is there: an argument naming the trial's own files stays relative
    assert resolve_code_paths(["bash", "make-output.sh"], code) == (["bash", "make-output.sh"], None)


def test_what_counts_as_a_setup_error() -> None:
    assert setup_error(SETUP_ERROR_EXIT, "", kind="python")
    assert not setup_error(1, "ModuleNotFoundError", kind="python")  # raised by the function itself
    assert setup_error(2, "python: can't open file '/w/trian.py': [Errno 2]", kind="command")
    assert not setup_error(2, "usage: train.py [-h]\ntrain.py: error: bad flag", kind="command")
    assert not setup_error(1, "can't open file 'data.csv'", kind="command")


@pytest.mark.parametrize(
    ("outputs", "error"),
    [
        (["/etc/passwd"], "outputs.0: a glob relative to the trial's directory"),
        (["ok.pt", "../up.pt"], "outputs.1: a glob of files inside the trial's directory"),
        (["a/../../b"], "outputs.0: a glob of files inside"),
        (["a\\b"], "outputs.0: may not contain NUL characters or backslashes"),
        (["~/x"], "outputs.0: a glob relative"),
    ],
)
def test_outputs_stay_inside_the_trials_directory(outputs: list[str], error: str, tmp_path: Path) -> None:
    body = program_study("outs", tmp_path, n_trials=1)
    body["objective"]["outputs"] = outputs
    with pytest.raises(ValueError, match=error.replace("(", r"\(")):
        StudyDefinition.model_validate(body)
    body["objective"]["outputs"] = ["checkpoint.pt", "plots/*.png", "**/*.json"]
    assert StudyDefinition.model_validate(body).objective.outputs == [
        "checkpoint.pt",
        "plots/*.png",
        "**/*.json",
    ]
    external = {"name": "ext", "search_space": body["search_space"], "objective": {"outputs": ["a"]}}
    with pytest.raises(ValueError, match="outputs: only for kind python or command"):
        StudyDefinition.model_validate(external)
