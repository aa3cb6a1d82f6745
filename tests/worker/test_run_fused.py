"""How a fused python objective's return value and exceptions end each member (caviar.worker._run_fused)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from caviar._client import Trial
from caviar.worker import _run_fused
from caviar.worker._fused_program import fuse_size, shared_names


def member(tmp_path: Path, number: int, *, prune: bool = False) -> Trial:
    trial = Trial(
        None,  # type: ignore[arg-type]  # a worker's child tells through its result file, never the client
        {"study": "s", "number": number, "params": {}},
        worker_id=None,
        heartbeat=False,
        result_file=str(tmp_path / f"result-{number}.json"),
    )
    trial._prune = prune
    return trial


def told(tmp_path: Path, number: int) -> dict[str, Any] | None:
    path = tmp_path / f"result-{number}.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_each_member_gets_its_value_and_a_pruned_one_ends_pruned(tmp_path: Path) -> None:
    trials = [member(tmp_path, 0), member(tmp_path, 1, prune=True), member(tmp_path, 2)]
    trials[2].tell(0.5)  # told inside the objective: its entry is ignored
    assert _run_fused.finish(trials, [0.9, None, 0.1]) is None
    assert told(tmp_path, 0) == {"state": "complete", "values": [0.9]}
    assert told(tmp_path, 1) == {"state": "pruned"}
    assert told(tmp_path, 2) == {"state": "complete", "values": [0.5]}


def test_none_for_a_member_the_pruner_did_not_stop_fails_it(tmp_path: Path) -> None:
    trials = [member(tmp_path, 0), member(tmp_path, 1)]
    assert _run_fused.finish(trials, (0.9, None)) is None
    assert told(tmp_path, 1) == {
        "state": "fail",
        "reason": "the objective returned None for member 1 (trial 1)",
    }


@pytest.mark.parametrize("result", [0.9, [0.9], None])
def test_a_result_that_is_not_one_value_per_member_is_an_error(tmp_path: Path, result: Any) -> None:
    trials = [member(tmp_path, 0), member(tmp_path, 1, prune=True)]
    error = _run_fused.finish(trials, result)
    assert error is not None and "returns a list of 2 values" in error
    assert told(tmp_path, 0) is None  # the worker fails it with the child's exit status
    assert told(tmp_path, 1) == {"state": "pruned"}


def study(fuse: int | None, *, started: int = 10, warmup: int = 4, **objective: Any) -> dict[str, Any]:
    return {
        "definition": {
            "objective": {"kind": "python", "entrypoint": "m:f", "fuse": fuse, **objective},
            "search_space": {
                "lr": {"type": "float"},
                "hidden": {"type": "int"},
                "act": {"type": "categorical"},
            },
        },
        "trials_started": started,
        "warmup_trials": warmup,
    }


def test_group_size_and_shared_parameters() -> None:
    assert fuse_size(study(None)) is None  # an ordinary python objective: one trial per child
    assert fuse_size(study(8)) == 8
    assert fuse_size(study(8, started=3)) == 1  # the sampler's start-up trials: one per group
    assert shared_names(study(8)["definition"]) == ["hidden", "act"]
    assert shared_names(study(8, shared=["hidden", "lr"])["definition"]) == ["hidden", "lr"]
