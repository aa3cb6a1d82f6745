"""Fused groups keep the search alive: a fused study explores every non-fusible hyperparameter
(batch size, width, optimizer, ...) about as much as an unfused study of the same budget.

Coverage of a dimension: the share of its choices (categorical) or of 8 equal bins of its sampling
scale (numbers; log for log-scaled ones) that the study's trials touched. Coverage depends on what
is sampled, not on how long each trial trains: CI trains each trial one epoch, ``make test-long``
(``CAVIAR_TEST_LONG=1``) five.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from caviar.service import processes, store
from caviar.service.db import Database
from caviar.service.examples import example_path
from caviar.service.processes import CaviarProcess
from caviar.service.trials import list_trials
from caviar.trainer.spec import FUSIBLE
from tests.conftest import LONG_RUN

pytestmark = pytest.mark.slow
BINS = 8


def coverage(spec: dict[str, Any], values: list[Any]) -> float:
    """The share of a dimension's choices, or of its 8 sampling-scale bins, that ``values`` touch."""
    if spec["type"] == "categorical":
        return len({repr(v) for v in values}) / len(spec["choices"])
    forward: Callable[[float], float] = math.log if spec.get("scale") == "log" else float
    low, high = forward(spec["low"]), forward(spec["high"])
    bins = {min(BINS - 1, int((forward(v) - low) / (high - low) * BINS)) for v in values}
    return len(bins) / BINS


def run_study(db: Database, db_url: str, tmp_path: Path, name: str, fuse: int) -> dict[str, float]:
    body = yaml.safe_load(example_path("digits-mlp").read_text())
    body["name"] = name
    body["objective"].update(max_epochs=5 if LONG_RUN else 1, fuse=fuse)
    body["budget"].update(n_trials=60, max_parallel=16)
    store.create_study(db, store.parse_definition(body))
    server, url = processes.serve(db_url, log=tmp_path / f"{name}-serve.log")
    with server:
        worker = CaviarProcess(
            [
                "worker",
                "--url",
                url,
                "--gpus",
                "none",
                "--cpu",
                "2",
                "--study",
                name,
                "--exit-when-idle",
                "2",
            ],
            log=tmp_path / f"{name}-worker.log",
        )
        assert worker.wait(600) == 0, worker.output()
    trials = list_trials(db, name, limit=1000).items
    assert len([t for t in trials if t.state in ("complete", "pruned")]) == 60
    space = body["search_space"]
    searched = [n for n in space if n not in FUSIBLE and "when" not in space[n]]
    return {n: coverage(space[n], [t.params[n] for t in trials if n in t.params]) for n in searched}


def test_a_fused_study_explores_non_fusible_dimensions_like_an_unfused_one(
    db: Database, db_url: str, tmp_path: Path
) -> None:
    fused = run_study(db, db_url, tmp_path, "fused", fuse=4)
    unfused = run_study(db, db_url, tmp_path, "unfused", fuse=1)
    print(f"\ncoverage fused {fused}\ncoverage unfused {unfused}")
    assert set(fused) == {"batch_size", "hidden_units", "optimizer"}
    for name in fused:
        assert fused[name] >= 0.75 * unfused[name], (name, fused, unfused)
