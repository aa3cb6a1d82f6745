"""Smoke tests of the speed benchmarks: they run, their baselines sit beside caviar's numbers."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

from benchmarks import fused_training, time_to_quality
from benchmarks.time_to_quality import Curve


@pytest.mark.slow
def test_fused_training_prints_plain_beside_fused(capsys: pytest.CaptureFixture[str]) -> None:
    fused_training.main(["--quick", "--datasets", "digits", "--ks", "1,4", "--epochs", "1", "--repeat", "2"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(line["K"], line["method"]) for line in lines} == {
        (1, "plain"),
        (1, "fused"),
        (4, "plain"),
        (4, "fused"),
    }
    for line in lines:
        assert line["threads_per_proc"] == 1 and line["repeat"] == 2
        assert line["seconds"]["min"] <= line["seconds"]["median"] <= line["seconds"]["max"]
        assert 0 <= line["mean_val_accuracy"] <= 1
    assert next(line for line in lines if line["K"] == 4)["procs"] == 2


def arm(times: list[float], values: list[float], wall: float) -> dict[str, Any]:
    bests = [max(values[: i + 1]) for i in range(len(values))]
    return {
        "_curve": Curve(times, bests, values),
        "_timeline": [],
        "final_best": bests[-1],
        "first_trials_median_value": 0.2,
        "wall_s": wall,
        "startup_s": 1.0,
        "processes_exited_s": wall + 1,
        "epochs": 100,
        "n_trials": len(values),
        "complete": len(values),
        "pruned": 0,
        "failed": 0,
    }


def test_time_to_quality_measures_against_the_plain_final_best() -> None:
    args = argparse.Namespace(epsilon=0.005, slots=2, timeline=False, seeds=1, storage="sqlite", mode="same")
    args.quick, args.n_trials, args.max_epochs, args.fuse, args.pruner = True, 4, 4, 2, "asha"
    arms = {
        "caviar": arm([2.0, 4.0, 5.0], [0.5, 0.61, 0.62], wall=6.0),
        "plain": arm([3.0, 9.0, 12.0], [0.55, 0.58, 0.60], wall=12.0),
    }
    caviar, plain, comparison = time_to_quality.compare(0, arms, args)
    assert plain["time_to_plain_final_best_s"] == 12.0
    assert caviar["time_to_plain_final_best_s"] == 4.0
    assert comparison["speedup_to_plain_final_best"] == 3.0
    assert caviar["best_at_plain_time_to_final_best"] == 0.62
    assert comparison["caviar_minus_plain_best_at_0.25_plain_wall"] == pytest.approx(0.5 - 0.55)
    assert comparison["caviar_minus_plain_best_at_0.5_plain_wall"] == pytest.approx(0.62 - 0.55)
    assert comparison["plain_gap_first_to_final"] == pytest.approx(0.05)
    summary = time_to_quality.summary([caviar, plain, comparison], args)
    assert summary["speedup_to_plain_final_best"]["median"] == 3.0
    # an arm that never reaches the bar reports null, and the summary counts it as missing
    arms["caviar"] = arm([2.0], [0.5], wall=3.0)
    caviar, _, comparison = time_to_quality.compare(0, arms, args)
    assert caviar["time_to_plain_final_best_s"] is None and comparison["speedup_to_plain_final_best"] is None


def test_a_seed_that_never_reaches_the_bar_counts_against_the_median() -> None:
    speedups = time_to_quality.spread([3.6, None, 1.0], missing_as=0.0)
    assert speedups == {"median": 1.0, "min": 0.0, "max": 3.6, "missing": 1}
    times = time_to_quality.spread([70.0, None, None], missing_as=float("inf"))
    assert times == {"median": None, "min": 70.0, "max": None, "missing": 2}


def test_the_defaults_mode_names_nothing_but_the_budget() -> None:
    """caviar's arm of ``--mode defaults`` is what a user gets by naming no sampler and no pruner."""
    from caviar.service.store import parse_definition

    body = time_to_quality.caviar_definition("d", 0, 40, 15, 8, "median", defaults=True)
    assert "pruner" not in body and body["sampler"] == {"seed": 0} and body["budget"] == {"n_trials": 40}
    parsed = parse_definition(body)
    assert parsed.pruner.type == "asha" and parsed.sampler.type == "auto"
    assert time_to_quality.plain_pruner("default", 15).__class__.__name__ == "MedianPruner"
