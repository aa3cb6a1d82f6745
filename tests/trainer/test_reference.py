"""caviar's trainer against a reference written here with ``nn.Module`` and ``torch.optim``.

The same configuration is trained twice from the same initial weights and the same data order:
once by :func:`caviar.trainer.train` (fused layers, hand-written fused optimizers) and once by a
plain PyTorch loop (``nn.Linear``, ``nn.BatchNorm1d``, ``torch.optim``). The loss of every
mini-batch, the validation loss of every epoch (batch norm in eval mode, running statistics) and
the per-epoch history must agree within float32 tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from caviar.trainer import Dataset, TrialConfig, train
from caviar.trainer import _train as train_module
from caviar.trainer._layers import build_model
from caviar.trainer._rng import STREAM_SHUFFLE, stream_seed

EPOCHS = 3
RTOL, ATOL = 2e-4, 2e-5

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

CASES: list[tuple[str, dict[str, Any], OptimizerFactory]] = [
    ("sgd", {"optimizer": "sgd", "lr": 0.05}, lambda p: torch.optim.SGD(p, lr=0.05)),
    (
        "momentum",
        {"optimizer": "momentum", "lr": 0.02, "momentum": 0.85},
        lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.85),
    ),
    (
        "rmsprop",
        {"optimizer": "rmsprop", "lr": 0.002, "beta2": 0.95, "eps": 1e-6},
        lambda p: torch.optim.RMSprop(p, lr=0.002, alpha=0.95, eps=1e-6),
    ),
    (
        # few steps and a low beta2: the bias correction (1 - beta^t) matters on every step
        "adam",
        {"optimizer": "adam", "lr": 0.003, "beta1": 0.8, "beta2": 0.99, "eps": 1e-7},
        lambda p: torch.optim.Adam(p, lr=0.003, betas=(0.8, 0.99), eps=1e-7),
    ),
    (
        "sgd_l2",
        {"optimizer": "sgd", "lr": 0.05, "weight_decay": 0.05},
        lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=0.05),
    ),
    (
        "adam_l2_batch_norm",
        {"optimizer": "adam", "lr": 0.003, "weight_decay": 0.02, "batch_norm": True},
        lambda p: torch.optim.Adam(p, lr=0.003, weight_decay=0.02),
    ),
    (
        "momentum_batch_norm",
        {"optimizer": "momentum", "lr": 0.02, "momentum": 0.9, "batch_norm": True},
        lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
    ),
]


def reference_model(config: TrialConfig, data: Dataset) -> nn.Sequential:
    """A plain MLP with the trainer's architecture, holding the trainer's initial weights.

    The initial weights come from the trainer's own initialisation (so both runs start alike);
    everything after that is plain PyTorch.
    """
    fused = build_model(
        "mlp", 1, data.n_features, data.n_classes, None, config.layers, config.hidden_units, config.batch_norm
    )
    fused.init_members([config.seed], config.init)
    modules: list[nn.Module] = []
    width = data.n_features
    for i in range(config.layers):
        linear = nn.Linear(width, config.hidden_units, bias=not config.batch_norm)
        with torch.no_grad():
            linear.weight.copy_(fused.layers[i].weight[0].T)
            if linear.bias is not None:
                linear.bias.copy_(fused.layers[i].bias[0])
        modules.append(linear)
        if config.batch_norm:
            modules.append(nn.BatchNorm1d(config.hidden_units))  # weight 1, bias 0, like the trainer's
        modules.append(nn.ReLU())
        width = config.hidden_units
    head = nn.Linear(width, data.n_classes)
    with torch.no_grad():
        head.weight.copy_(fused.head.weight[0].T)
        head.bias.copy_(fused.head.bias[0])
    modules.append(head)
    return nn.Sequential(*modules)


def reference_run(
    config: TrialConfig, data: Dataset, make_optimizer: OptimizerFactory
) -> tuple[list[float], list[float], list[float]]:
    """(loss of every step, mean training loss per epoch, validation loss per epoch)."""
    model = reference_model(config, data)
    optimizer = make_optimizer(list(model.parameters()))
    # the data order: one permutation per epoch from the member's shuffling stream
    shuffle = torch.Generator().manual_seed(stream_seed(config.seed, STREAM_SHUFFLE))
    x, y = data.X_train, data.y_train
    steps: list[float] = []
    epoch_train: list[float] = []
    epoch_val: list[float] = []
    for _ in range(config.max_epochs):
        model.train()
        order = torch.randperm(len(x), generator=shuffle)
        total = 0.0
        for start in range(0, len(x), config.batch_size):
            index = order[start : start + config.batch_size]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps.append(loss.item())
            total += loss.item() * len(index)
        epoch_train.append(total / len(x))
        model.eval()
        with torch.no_grad():
            epoch_val.append(F.cross_entropy(model(data.X_val), data.y_val).item())
    return steps, epoch_train, epoch_val


def caviar_run(
    config: TrialConfig, data: Dataset, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[float], list[float], list[float]]:
    """The same three series from caviar's trainer (each step's loss read off its cross-entropy)."""
    steps: list[float] = []
    val: list[float] = []

    def recording_cross_entropy(*args: Any, **kwargs: Any) -> torch.Tensor:
        losses = F.cross_entropy(*args, **kwargs)
        (val if not torch.is_grad_enabled() else steps).append(losses.detach().mean().item())
        return losses

    monkeypatch.setattr(train_module, "F", SimpleNamespace(cross_entropy=recording_cross_entropy))
    result = train(config, data)
    monkeypatch.undo()
    assert result.epochs == config.max_epochs
    assert [h["val_loss"] for h in result.history] == pytest.approx(val, rel=1e-6)
    return steps, [h["train_loss"] for h in result.history], [h["val_loss"] for h in result.history]


@pytest.mark.parametrize(("name", "overrides", "make_optimizer"), CASES, ids=[c[0] for c in CASES])
def test_trainer_matches_a_plain_pytorch_loop(
    name: str,
    overrides: dict[str, Any],
    make_optimizer: OptimizerFactory,
    small_tabular: Dataset,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = TrialConfig(
        layers=2,
        hidden_units=16,
        batch_size=50,
        max_epochs=EPOCHS,
        dropout=0.0,
        device="cpu",
        seed=3,
        **overrides,
    )
    ours = caviar_run(config, small_tabular, monkeypatch)
    theirs = reference_run(config, small_tabular, make_optimizer)
    n_steps = EPOCHS * math.ceil(len(small_tabular.X_train) / config.batch_size)
    assert len(ours[0]) == len(theirs[0]) == n_steps
    for label, mine, reference in zip(
        ("step loss", "epoch train loss", "val loss"), ours, theirs, strict=True
    ):
        assert mine == pytest.approx(reference, rel=RTOL, abs=ATOL), (name, label)
    # the run actually learned something (a broken comparison of two frozen models would pass too)
    assert ours[2][-1] < ours[2][0] or ours[0][-1] < ours[0][0]
