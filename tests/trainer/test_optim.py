"""Fused optimizers against torch.optim, Adam's bias correction, regularisers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from caviar.trainer import Dataset, TrialConfig, train
from caviar.trainer._optim import FusedOptimizer

_DEFAULTS = {
    "momentum": [0.9],
    "beta1": [0.9],
    "beta2": [0.999],
    "eps": [1e-8],
    "weight_decay": [0.0],
    "l1": [0.0],
}


def _coefficients(**values: float) -> dict[str, list[float]]:
    coefficients = dict(_DEFAULTS)
    coefficients.update({name: [value] for name, value in values.items()})
    return coefficients


@pytest.mark.parametrize(
    ("kind", "values", "reference"),
    [
        ("sgd", {"lr": 0.1, "weight_decay": 0.01}, lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01)),
        ("momentum", {"lr": 0.1}, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
        (
            "rmsprop",
            {"lr": 0.01, "beta2": 0.99},
            lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.99, eps=1e-8),
        ),
        ("adam", {"lr": 0.01, "weight_decay": 0.1}, lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1)),
        (
            "adamw",
            {"lr": 0.01, "weight_decay": 0.1},
            lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
        ),
    ],
)
def test_matches_torch_optim(
    kind: str, values: dict[str, float], reference: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
) -> None:
    torch.manual_seed(0)
    start = torch.randn(4, 3)
    fused = torch.nn.Parameter(start.clone().unsqueeze(0))
    plain = torch.nn.Parameter(start.clone())
    ours, theirs = FusedOptimizer([fused], kind, _coefficients(**values)), reference([plain])
    for _ in range(6):
        grad = torch.randn(4, 3)
        fused.grad, plain.grad = grad.clone().unsqueeze(0), grad.clone()
        ours.step()
        theirs.step()
    assert torch.allclose(fused[0], plain, atol=1e-6)


def test_adam_bias_correction_makes_the_first_step_lr_sized() -> None:
    lr = 1e-3
    for scale in (1e-4, 1.0, 1e3):
        param = torch.nn.Parameter(torch.zeros(2, 50))
        opt = FusedOptimizer([param], "adam", {**_DEFAULTS, "lr": [lr, lr], "beta2": [0.999, 0.9]})
        param.grad = torch.randn(2, 50) * scale
        opt.step()
        # Uncorrected moments would give lr * 0.1 / sqrt(0.001) ~ 3.2 lr for member 0.
        assert param.detach().abs().sub(lr).abs().max().item() < 1e-6 * max(1.0, 1 / scale)
        assert torch.equal(torch.sign(param.detach()), -torch.sign(param.grad))


def test_members_use_their_own_coefficients() -> None:
    param = torch.nn.Parameter(torch.zeros(3, 2))
    opt = FusedOptimizer([param], "sgd", {**_DEFAULTS, "lr": [0.1, 0.2, 0.3], "momentum": [0.0] * 3,
                                           "beta1": [0.9] * 3, "beta2": [0.9] * 3, "eps": [1e-8] * 3,
                                           "weight_decay": [0.0] * 3, "l1": [0.0] * 3})  # fmt: skip
    param.grad = torch.ones(3, 2)
    opt.step()
    assert param.detach()[:, 0].tolist() == pytest.approx([-0.1, -0.2, -0.3])


def _norms(config: TrialConfig, data: Dataset) -> tuple[float, float]:
    state = train(config, data).state_dict()
    weights = [t for name, t in state.items() if name.endswith("weight")]
    return sum(float(w.pow(2).sum()) for w in weights), sum(float(w.abs().sum()) for w in weights)


def test_l2_and_l1_shrink_the_weights(small_tabular: Dataset) -> None:
    base = TrialConfig(optimizer="momentum", lr=0.05, hidden_units=32, max_epochs=8, batch_size=32)
    l2_plain, l1_plain = _norms(base, small_tabular)
    l2_decayed, _ = _norms(TrialConfig(**{**base.to_params(), "weight_decay": 0.05}), small_tabular)
    _, l1_sparse = _norms(TrialConfig(**{**base.to_params(), "l1": 0.005}), small_tabular)
    assert l2_decayed < 0.8 * l2_plain
    assert l1_sparse < 0.8 * l1_plain
    adamw_plain, _ = _norms(
        TrialConfig(**{**base.to_params(), "optimizer": "adamw", "lr": 0.01}), small_tabular
    )
    adamw_decay, _ = _norms(
        TrialConfig(**{**base.to_params(), "optimizer": "adamw", "lr": 0.01, "weight_decay": 0.5}),
        small_tabular,
    )
    assert adamw_decay < 0.8 * adamw_plain
