"""The training loop: accuracy, fused == single equivalence, pruning, early stopping, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from caviar.trainer import Dataset, TrialConfig, load_dataset, load_model, train, train_group
from caviar.trainer import _train as train_module
from caviar.trainer._layers import FusedModel

_FAST = {"hidden_units": 32, "max_epochs": 3, "batch_size": 64, "device": "cpu"}


def _history(result: train_module.TrialResult) -> np.ndarray:
    keys = ("lr", "train_loss", "val_loss", "val_accuracy")
    return np.array([[h[k] for k in keys] for h in result.history])


def test_digits_reaches_95_percent(digits: Dataset) -> None:
    result = train(TrialConfig(lr=3e-3, hidden_units=128, max_epochs=8, seed=0), digits)
    assert result.metrics["val_accuracy"] >= 0.95
    assert result.epochs == 8 and len(result.history) == 8 and not result.pruned
    assert set(result.metrics) == {"val_accuracy", "val_loss", "train_loss"}
    assert result.metrics["val_loss"] == result.history[-1]["val_loss"]
    assert result.seconds > 0


def test_same_seed_same_history_different_seed_differs(digits: Dataset) -> None:
    cfg = TrialConfig(dropout=0.3, augment=0.3, **_FAST)
    first, second = train(cfg, digits), train(cfg, digits)
    assert first.history == second.history
    other = train(TrialConfig(**{**cfg.to_params(), "seed": 1}), digits)
    assert other.history != first.history


_VARIED = [
    {"lr": 1e-3, "seed": 0},
    {"lr": 3e-3, "seed": 1, "dropout": 0.3, "weight_decay": 1e-3, "augment": 0.2},
    {"lr": 2e-3, "seed": 2, "l1": 1e-4, "momentum": 0.8, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6},
]


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "rmsprop", "adam", "adamw"])
def test_fused_group_equals_single_runs(digits: Dataset, optimizer: str) -> None:
    scale = 20.0 if optimizer in ("sgd", "momentum") else 1.0
    configs = [
        TrialConfig(
            optimizer=optimizer,
            lr_decay="inverse_time",
            **{**_FAST, **v, "lr": v["lr"] * scale, "lr_decay_rate": 0.1 * i},  # type: ignore[arg-type]
        )
        for i, v in enumerate(_VARIED)
    ]
    fused = train_group(configs, digits)
    for config, member in zip(configs, fused, strict=True):
        alone = train(config, digits)
        assert member.config == config and member.epochs == alone.epochs
        np.testing.assert_allclose(_history(member), _history(alone), rtol=1e-4, atol=1e-5)
        for name, tensor in alone.state_dict().items():
            torch.testing.assert_close(member.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)


def test_fused_cnn_with_batch_norm_equals_single_runs(digits: Dataset) -> None:
    base = {"model": "cnn", "hidden_units": 8, "batch_norm": True, "max_epochs": 2, "device": "cpu"}
    configs = [
        TrialConfig(**base, lr=3e-3, seed=0, augment=0.5),  # type: ignore[arg-type]
        TrialConfig(**base, lr=1e-3, seed=1, dropout=0.2),  # type: ignore[arg-type]
    ]
    fused = train_group(configs, digits)
    for config, member in zip(configs, fused, strict=True):
        np.testing.assert_allclose(_history(member), _history(train(config, digits)), rtol=1e-4, atol=1e-5)


def test_cnn_learns_digits(digits: Dataset) -> None:
    cfg = TrialConfig(model="cnn", hidden_units=32, batch_norm=True, lr=3e-3, max_epochs=3, device="cpu")
    assert train(cfg, digits).metrics["val_accuracy"] >= 0.9


def test_pruning_stops_only_that_member_and_compacts(
    digits: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = [
        TrialConfig(lr=lr, seed=s, **{**_FAST, "max_epochs": 4}) for s, lr in enumerate([1e-3, 3e-3, 2e-3])
    ]
    reference = train_group(configs, digits)
    sizes: list[int] = []
    original = FusedModel.select

    def spy(self: FusedModel, index: torch.Tensor) -> None:
        sizes.append(len(index))
        original(self, index)

    monkeypatch.setattr(FusedModel, "select", spy)
    calls: list[tuple[int, int]] = []

    def report(member: int, step: int, value: float) -> bool:
        calls.append((member, step))
        assert 0.0 <= value <= 1.0
        return member == 1 and step == 1

    results = train_group(configs, digits, report)
    assert sizes == [2]  # member 1 left the group after epoch 1
    assert results[1].pruned and results[1].epochs == 2 and len(results[1].history) == 2
    assert results[1].history == reference[1].history[:2]
    assert results[1].metrics["val_accuracy"] == results[1].history[-1]["val_accuracy"]
    for k in (0, 2):
        assert not results[k].pruned and results[k].epochs == 4
        np.testing.assert_allclose(_history(results[k]), _history(reference[k]), rtol=1e-5, atol=1e-6)
    assert (1, 2) not in calls and (0, 3) in calls and (2, 3) in calls


def test_train_report_prunes(digits: Dataset) -> None:
    seen: list[int] = []
    result = train(TrialConfig(**_FAST), digits, report=lambda step, value: seen.append(step) or step >= 1)
    assert result.pruned and result.epochs == 2 and seen == [0, 1]


def test_early_stopping_restores_the_best_epoch(tmp_path: Path) -> None:
    noisy = load_dataset(
        "synthetic", n_samples=400, n_features=30, n_classes=2, n_informative=4, class_sep=0.5
    )
    cfg = TrialConfig(lr=1e-2, hidden_units=256, max_epochs=60, patience=3, batch_size=32, device="cpu")
    result = train(cfg, noisy)
    losses = [h["val_loss"] for h in result.history]
    assert result.epochs < 60, "the run should stop early"
    assert result.best_epoch == int(np.argmin(losses))
    assert result.epochs == result.best_epoch + 1 + cfg.patience
    assert result.metrics == {k: result.history[result.best_epoch][k] for k in result.metrics}
    assert result.metrics["val_loss"] < losses[-1]
    # The returned weights are the best epoch's: re-evaluating them gives its validation loss.
    result.save(tmp_path / "best.pt")
    model = load_model(tmp_path / "best.pt")
    raw_val = noisy.X_val * noisy.std + noisy.mean
    probabilities = torch.as_tensor(model.predict_proba(raw_val))
    val_loss = torch.nn.functional.nll_loss(probabilities.log(), noisy.y_val).item()
    assert val_loss == pytest.approx(result.metrics["val_loss"], rel=1e-3)


def test_checkpoint_round_trip(digits: Dataset, tmp_path: Path) -> None:
    result = train(TrialConfig(batch_norm=True, **_FAST), digits)
    state = result.state_dict()
    assert state["layers.0.weight"].shape == (64, 32) and "norms.0.running_mean" in state
    result.save(tmp_path / "model.pt")
    model = load_model(tmp_path / "model.pt")
    assert model.config == result.config
    raw_val = (digits.X_val * digits.std + digits.mean).numpy()
    predictions = model.predict(raw_val)
    accuracy = float((predictions == digits.y_val.numpy()).mean())
    assert accuracy == pytest.approx(result.metrics["val_accuracy"], abs=0.01)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")


def test_augmentation_runs_only_on_training_batches(digits: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    original = train_module.augment_batch

    def spy(x: torch.Tensor, *args: object) -> torch.Tensor:
        sizes.append(x.shape[1])
        return original(x, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module, "augment_batch", spy)
    train(TrialConfig(augment=0.5, **{**_FAST, "max_epochs": 2}), digits)
    batches = -(-len(digits.X_train) // 64)
    assert len(sizes) == 2 * batches and max(sizes) == 64
    sizes.clear()
    train(TrialConfig(**{**_FAST, "max_epochs": 1}), digits)
    assert sizes == []


def test_group_and_model_errors(digits: Dataset) -> None:
    tabular = load_dataset("wine")
    with pytest.raises(ValueError, match="model 'cnn' needs an image dataset"):
        train(TrialConfig(model="cnn", device="cpu"), tabular)
    with pytest.raises(ValueError, match=r"^layers differs"):
        train_group([TrialConfig(layers=1), TrialConfig(layers=2)], digits)
    with pytest.raises(ValueError, match=r"^max_epochs differs"):
        train_group([TrialConfig(max_epochs=1), TrialConfig(max_epochs=2)], digits)


def test_report_sends_the_chosen_metric(small_tabular) -> None:
    from caviar.trainer import TrialConfig, train

    seen: list[tuple[int, float]] = []
    config = TrialConfig(hidden_units=16, max_epochs=3, batch_size=64, seed=0)
    result = train(
        config, small_tabular, lambda step, value: seen.append((step, value)) or False, metric="val_loss"
    )
    assert seen == [(h["epoch"], h["val_loss"]) for h in result.history]
    with pytest.raises(ValueError, match="metric"):
        train(config, small_tabular, metric="f1")


def test_on_result_reports_each_member_as_it_leaves(small_tabular) -> None:
    from caviar.trainer import TrialConfig, train_group

    configs = [TrialConfig(hidden_units=16, max_epochs=4, batch_size=64, seed=s, lr=1e-3) for s in range(3)]
    order: list[tuple[int, int]] = []
    results = train_group(
        configs,
        small_tabular,
        lambda member, step, value: member == 1 and step == 1,  # prune member 1 after epoch 1
        on_result=lambda member, result: order.append((member, result.epochs)),
    )
    assert order[0] == (1, 2)  # recorded as soon as it was pruned, before the others finished
    assert sorted(order) == [(0, 4), (1, 2), (2, 4)]
    assert [r.pruned for r in results] == [False, True, False]


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_refilled_members_train_as_if_alone(digits: Dataset, optimizer: str) -> None:
    """A member that joins a running group (in a pruned member's place) gets its solo history."""
    base = {**_FAST, "max_epochs": 4, "optimizer": optimizer, "lr_decay": "exponential", "lr_decay_rate": 0.1}
    configs = [TrialConfig(lr=lr, seed=s, **base) for s, lr in enumerate([1e-3, 3e-3, 2e-3])]
    newcomer = TrialConfig(lr=5e-3, seed=7, **base)
    offered: list[int] = []

    def refill(free: int) -> list[TrialConfig]:
        offered.append(free)
        return [newcomer] if len(offered) == 1 else []

    results = train_group(configs, digits, lambda m, step, v: m == 1 and step == 1, refill=refill)
    assert offered[0] == 1 and len(results) == 4
    assert results[1].pruned and results[1].epochs == 2
    alone = train(newcomer, digits)
    assert results[3].epochs == 4 and [h["epoch"] for h in results[3].history] == [0, 1, 2, 3]
    np.testing.assert_allclose(_history(results[3]), _history(alone), rtol=1e-5, atol=1e-6)
    reference = train_group(configs, digits)
    for k in (0, 2):
        np.testing.assert_allclose(_history(results[k]), _history(reference[k]), rtol=1e-5, atol=1e-6)


def test_a_group_emptied_by_pruning_restarts_with_refills(digits: Dataset) -> None:
    configs = [TrialConfig(lr=1e-3, seed=0, **{**_FAST, "max_epochs": 3})]
    joiner = TrialConfig(lr=2e-3, seed=3, **{**_FAST, "max_epochs": 3})
    queue = [joiner]
    results = train_group(
        configs, digits, lambda m, step, v: m == 0, refill=lambda free: [queue.pop()] if queue else []
    )
    assert [r.pruned for r in results] == [True, False]
    np.testing.assert_allclose(_history(results[1]), _history(train(joiner, digits)), rtol=1e-5, atol=1e-6)


def test_report_epoch_sees_the_group_side_by_side_and_its_prunes_are_refilled(small_tabular) -> None:
    """``report_epoch`` gets every live member's (member, own step, value) once per epoch; the members
    it returns leave at once and refills take their places at their own step 0."""
    configs = [TrialConfig(hidden_units=16, max_epochs=3, batch_size=64, seed=s, lr=1e-3) for s in range(3)]
    joiner = TrialConfig(hidden_units=16, max_epochs=3, batch_size=64, seed=9, lr=2e-3)
    seen: list[list[tuple[int, int]]] = []
    queue = [joiner]

    def report_epoch(entries: list[tuple[int, int, float]]) -> set[int]:
        seen.append([(member, step) for member, step, _ in entries])
        assert all(0.0 <= value <= 1.0 for _, _, value in entries)  # val_accuracy
        return {0, 2} if len(seen) == 1 else set()

    results = train_group(
        configs,
        small_tabular,
        report_epoch=report_epoch,
        refill=lambda free: [queue.pop()] if queue else [],
    )
    assert seen == [[(0, 0), (1, 0), (2, 0)], [(1, 1), (3, 0)], [(1, 2), (3, 1)], [(3, 2)]]
    assert [(r.pruned, r.epochs) for r in results] == [(True, 1), (False, 3), (True, 1), (False, 3)]
