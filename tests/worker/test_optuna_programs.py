"""Optuna code and unmodified programs on workers: an Optuna objective as ``kind: python``, a
``kind: command`` SDK program letting ``TrialPruned`` escape, metrics read from a program's own
output (regex, ``name=value``, JSON lines), and a program whose output caviar cannot read."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import caviar
from caviar.service import processes
from caviar.service.processes import CaviarProcess
from tests.test_optuna_trial import check_objective_trials, objective, undeclared_study

pytestmark = pytest.mark.slow

OBJECTIVES = textwrap.dedent(
    """
    import optuna


    def objective(trial):
        n_layers = trial.suggest_int("n_layers", 1, 3)
        widths = [trial.suggest_int(f"n_units_l{i}", 4, 64, log=True) for i in range(n_layers)]
        if n_layers > 1:
            trial.suggest_float("dropout", 0.0, 0.5)
        x = trial.suggest_float("x", 0.0, 1.0)
        optimizer = trial.suggest_categorical("optimizer", ["adam", "sgd"])
        trial.set_user_attr("first_width", widths[0])
        for step in range(3):
            trial.report(x + 0.01 * step, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return x + (0.05 if optimizer == "adam" else 0.0)
    """
)

SDK_PROGRAM = textwrap.dedent(
    """
    import caviar

    trial = caviar.current_trial()
    x = trial.suggest_float("x", 0.0, 1.0)
    for step in range(3):
        trial.report(x, step)
        if trial.should_prune():
            raise caviar.TrialPruned()  # escapes: the program exits non-zero
    trial.tell(x)
    """
)

# An unmodified training script: it knows nothing of caviar and prints its metrics its own way.
EPOCHS = textwrap.dedent(
    """
    import sys, time

    x = float(sys.argv[1])
    for epoch in range(5):
        print(f"epoch {epoch} train_loss {1 - x:.4f} val_acc {x + 0.01 * epoch:.6f}", flush=True)
        time.sleep(0.3)
    """
)

PAIRS = textwrap.dedent(
    """
    import json, sys

    x = float(sys.argv[1])
    with open("history.jsonl", "w") as history:
        for epoch in range(3):
            print(f"epoch={epoch} loss=0.5 val_acc={x + epoch:.6f}")
            history.write(json.dumps({"step": epoch, "val_acc": x + epoch}) + "\\n")
    """
)

CHATTY = "print('hello from the program')\nprint('training done, accuracy looks great')\n"


def test_the_objective_in_this_file_matches_the_one_the_worker_imports() -> None:
    """The worker runs OBJECTIVES; the checks are shared with the client test of ``objective``."""
    namespace: dict[str, Any] = {}
    exec(OBJECTIVES, namespace)
    assert namespace["objective"].__code__.co_names == objective.__code__.co_names


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "optuna_objectives.py").write_text(OBJECTIVES)
    (folder / "sdk_program.py").write_text(SDK_PROGRAM)
    (folder / "epochs.py").write_text(EPOCHS)
    (folder / "pairs.py").write_text(PAIRS)
    (folder / "chatty.py").write_text(CHATTY)
    return folder


@pytest.fixture
def url(db_url: str, tmp_path: Path) -> Iterator[str]:
    env = {"CAVIAR_HEARTBEAT_INTERVAL_S": "2", "CAVIAR_ARTIFACT_DIR": str(tmp_path / "artifacts")}
    server, base = processes.serve(db_url, env=env, log=tmp_path / "serve.log")
    yield base
    server.stop()


def run_worker(url: str, folder: Path, tmp: Path, *args: str) -> None:
    command = ["worker", "--url", url, "--gpus", "none", "--poll-interval", "0.2", "--allow-code", "all"]
    # children import the caviar under test (a checkout on PYTHONPATH), not an installed one
    command += ["--pass-env", "PYTHONPATH"]
    worker = CaviarProcess(
        [*command, "--cpu", "1", "--exit-when-idle", "1", *args],
        unset=("CAVIAR_DATABASE_URL",),
        log=tmp / f"worker-{time.monotonic_ns()}.log",
        cwd=folder,
    )
    assert worker.wait(240) == 0, worker.output()


def command_study(name: str, command: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "direction": "maximize",
        "metric": "val_acc",
        "search_space": {"x": {"type": "float", "low": 0.0, "high": 1.0}},
        "objective": {"kind": "command", "command": command, "timeout_s": 120},
        "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "threshold", "options": {"lower": 0.4}},
        "budget": {"n_trials": 6},
        **extra,
    }


def states(trials: list[dict[str, Any]]) -> dict[str, int]:
    found: dict[str, int] = {}
    for trial in trials:
        found[trial["state"]] = found.get(trial["state"], 0) + 1
    return found


def test_an_unmodified_optuna_objective_runs_as_kind_python(url: str, code_dir: Path, tmp_path: Path) -> None:
    body = undeclared_study("optuna-python", 10)
    body["objective"] = {"kind": "python", "entrypoint": "optuna_objectives:objective"}
    with caviar.Client(url) as client:
        study = client.create_study(body)
        run_worker(url, code_dir, tmp_path)
        check_objective_trials(study.trials(), 10)
        assert study.info()["state"] == "completed"


def test_an_sdk_program_letting_trial_pruned_escape_ends_pruned(
    url: str, code_dir: Path, tmp_path: Path
) -> None:
    body = command_study("sdk-pruned", ["python", "sdk_program.py"])
    body["search_space"] = {}  # the program suggests x itself
    with caviar.Client(url) as client:
        study = client.create_study(body)
        run_worker(url, code_dir, tmp_path)
        trials = study.trials()
    assert states(trials).keys() == {"complete", "pruned"}, trials  # none failed, so none retried
    assert len(trials) == 6 and all(t["retry_of"] is None for t in trials)
    for trial in trials:
        assert (trial["state"] == "pruned") == (trial["params"]["x"] < 0.4), trial


def test_a_regex_reads_an_unmodified_scripts_output_and_prunes_it_mid_run(
    url: str, code_dir: Path, tmp_path: Path
) -> None:
    body = command_study("regex", ["python", "epochs.py", "{x}"])
    pattern = r"^epoch (?P<step>\d+) .*val_acc (?P<value>[0-9.]+)"
    body["objective"]["metrics"] = {"format": "regex", "pattern": pattern}
    with caviar.Client(url) as client:
        study = client.create_study(body)
        run_worker(url, code_dir, tmp_path)
        trials = study.trials()
    assert states(trials).keys() == {"complete", "pruned"}, trials
    for trial in trials:
        x = trial["params"]["x"]
        if trial["state"] == "pruned":  # stopped at its first epoch, not trained to the end
            assert x < 0.4 and trial["intermediate_values"] == {"0": pytest.approx(x, abs=1e-6)}
        else:
            steps = trial["intermediate_values"]
            assert list(steps) == ["0", "1", "2", "3", "4"], steps
            assert trial["value"] == pytest.approx(x + 0.04, abs=1e-6)  # the last epoch it printed


def test_json_lines_are_read_from_the_trial_directory(url: str, code_dir: Path, tmp_path: Path) -> None:
    body = command_study(
        "jsonl", ["python", "pairs.py", "{x}"], pruner={"type": "none"}, budget={"n_trials": 2}
    )
    body["objective"]["metrics"] = {"format": "jsonl", "file": "history.jsonl"}
    with caviar.Client(url) as client:
        study = client.create_study(body)
        run_worker(url, code_dir, tmp_path)
        trials = study.trials()
    assert [t["state"] for t in trials] == ["complete", "complete"]
    for trial in trials:
        x = trial["params"]["x"]
        assert trial["intermediate_values"] == {str(e): pytest.approx(x + e) for e in range(3)}
        assert trial["value"] == pytest.approx(x + 2)


def test_stdout_pairs_are_read_with_the_metrics_option(url: str, code_dir: Path, tmp_path: Path) -> None:
    body = command_study(
        "stdout", ["python", "pairs.py", "{x}"], pruner={"type": "none"}, budget={"n_trials": 2}
    )
    body["objective"]["metrics"] = {}  # format stdout: `val_acc=X` pairs, the step from `epoch=N`
    with caviar.Client(url) as client:
        study = client.create_study(body)
        run_worker(url, code_dir, tmp_path)
        trials = study.trials()
    assert [t["state"] for t in trials] == ["complete", "complete"]
    for trial in trials:
        x = trial["params"]["x"]
        assert trial["intermediate_values"] == {str(e): pytest.approx(x + e, abs=1e-6) for e in range(3)}
        assert trial["value"] == pytest.approx(x + 2, abs=1e-6)


def test_unreadable_output_fails_the_first_trial_and_pauses_the_study(
    url: str, code_dir: Path, tmp_path: Path
) -> None:
    body = command_study("chatty", ["python", "chatty.py"], budget={"n_trials": 5, "max_retries": 2})
    body["objective"]["metrics"] = {"format": "regex", "pattern": r"val_acc (?P<value>\S+)"}
    with caviar.Client(url) as client:
        study = client.create_study(body)
        run_worker(url, code_dir, tmp_path)
        trials = study.trials()
        info = study.info()
    assert len(trials) == 1, trials  # exactly one trial ran: no retry, no second trial
    [failed] = trials
    assert failed["state"] == "fail"
    reason = failed["fail_reason"]
    assert "accuracy looks great" in reason and "val_acc (?P<value>" in reason, reason
    assert info["state"] == "paused" and "nothing caviar recognises" in info["stop_reason"], info
