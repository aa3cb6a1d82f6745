"""The fused example (examples/fused_python_objective): each member of a fused group trains exactly
as that trial would alone (same seed, same batches), its losses equal within float tolerance."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fused_python_objective" / "model.py"


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fused_example_model", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_fused_member_trains_as_its_solo_run() -> None:
    model = example()
    shared = {"hidden": 32, "dropout": 0.0}  # dropout off: a solo run draws other masks
    params = [{**shared, "lr": lr, "beta1": b} for lr, b in [(1e-3, 0.9), (1e-2, 0.85), (3e-2, 0.95)]]
    seeds = [11, 12, 13]
    never = lambda epoch, accuracies: set()  # noqa: E731
    _, accuracy, losses = model.fit(params, seeds, never, epochs=4)
    for member in range(3):
        _, solo_accuracy, solo_losses = model.fit([params[member]], [seeds[member]], never, epochs=4)
        assert [step[member] for step in losses] == pytest.approx([s[0] for s in solo_losses], rel=1e-5)
        assert accuracy[member] == pytest.approx(solo_accuracy[0])
    assert len({round(s[0] - s[2], 6) for s in losses}) > 1  # the lrs made different trajectories


def test_a_pruned_member_stops_and_the_others_train_on() -> None:
    model = example()
    params = [{"hidden": 16, "dropout": 0.1, "lr": 1e-2, "beta1": 0.9}] * 3
    reports: list[tuple[int, int]] = []

    def report(epoch: int, accuracies: dict[int, float]) -> set[int]:
        reports.extend((member, epoch) for member in accuracies)
        return {1} if epoch == 1 else set()

    fused, _, losses = model.fit(params, [1, 2, 3], report, epochs=4)
    assert [m for m, e in reports if e == 3] == [0, 2]
    assert fused.active.tolist() == [True, False, True]
    assert losses[-1][1] == 0.0 and losses[-1][0] > 0.0
