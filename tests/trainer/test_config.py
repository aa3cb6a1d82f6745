"""TrialConfig validation, params conversion, group rules and learning-rate schedules."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from caviar.trainer import FUSIBLE, HYPERPARAMETERS, TrialConfig, lr_at
from caviar.trainer.spec import check_group


def test_field_names_are_the_contract() -> None:
    expected = {
        "model", "layers", "hidden_units", "batch_norm", "dropout", "init", "optimizer", "lr", "momentum",
        "beta1", "beta2", "eps", "lr_decay", "lr_decay_rate", "lr_decay_steps", "weight_decay", "l1",
        "batch_size", "max_epochs", "patience", "augment", "seed", "device",
    }  # fmt: skip
    assert {f.name for f in dataclasses.fields(TrialConfig)} == expected
    assert expected == HYPERPARAMETERS
    assert FUSIBLE < HYPERPARAMETERS
    cfg = TrialConfig()
    assert (cfg.model, cfg.optimizer, cfg.lr, cfg.batch_size, cfg.device) == ("mlp", "adam", 1e-3, 64, "auto")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", -1, "lr must be > 0, got -1"),
        ("lr", 0.0, "lr must be > 0"),
        ("dropout", 1.0, "dropout must be in [0, 1)"),
        ("momentum", -0.1, "momentum must be in [0, 1)"),
        ("beta2", 1.0, "beta2 must be in [0, 1)"),
        ("eps", 0.0, "eps must be > 0"),
        ("weight_decay", -1e-3, "weight_decay must be >= 0"),
        ("l1", float("nan"), "l1 must be a finite number"),
        ("augment", -0.5, "augment must be >= 0"),
        ("layers", 0, "layers must be >= 1"),
        ("hidden_units", 2.5, "hidden_units must be an int"),
        ("batch_size", 0, "batch_size must be >= 1"),
        ("max_epochs", 0, "max_epochs must be >= 1"),
        ("patience", -1, "patience must be >= 0"),
        ("lr_decay_steps", 0, "lr_decay_steps must be >= 1"),
        ("model", "rnn", "model must be one of"),
        ("optimizer", "lbfgs", "optimizer must be one of"),
        ("init", "orthogonal", "init must be one of"),
        ("lr_decay", "cosine", "lr_decay must be one of"),
        ("device", "tpu", "device must be"),
        ("batch_norm", "yes", "batch_norm must be a bool"),
        ("seed", 1.5, "seed must be an int"),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        TrialConfig(**{field: value})


def test_step_decay_needs_a_factor() -> None:
    with pytest.raises(ValueError, match="lr_decay_rate must be in \\(0, 1\\] for lr_decay='step'"):
        TrialConfig(lr_decay="step")
    TrialConfig(lr_decay="step", lr_decay_rate=0.5)


def test_from_params_converts_and_rejects_unknown_keys() -> None:
    cfg = TrialConfig.from_params(
        {"lr": 0.01, "hidden_units": 64.0, "batch_size": 32.0, "dropout": 0, "seed": 3}
    )
    assert cfg.hidden_units == 64 and isinstance(cfg.hidden_units, int)
    assert cfg.batch_size == 32 and isinstance(cfg.batch_size, int)
    assert cfg.dropout == 0.0 and cfg.seed == 3
    assert TrialConfig.from_params(cfg.to_params()) == cfg
    with pytest.raises(ValueError, match="unknown hyperparameter 'learning_rate'"):
        TrialConfig.from_params({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="hidden_units must be an int"):
        TrialConfig.from_params({"hidden_units": 64.5})
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrialConfig.from_params({"lr": -1.0})


def test_group_rules_name_the_field() -> None:
    check_group([TrialConfig(lr=0.1, seed=1, dropout=0.3), TrialConfig(lr=0.2, seed=2, weight_decay=0.1)])
    with pytest.raises(ValueError, match=r"^hidden_units differs"):
        check_group([TrialConfig(), TrialConfig(hidden_units=64)])
    with pytest.raises(ValueError, match=r"^optimizer differs"):
        check_group([TrialConfig(optimizer="adam"), TrialConfig(optimizer="adamw")])
    with pytest.raises(ValueError, match=r"^batch_size differs"):
        check_group([TrialConfig(), TrialConfig(batch_size=32)])
    with pytest.raises(ValueError, match="at least one"):
        check_group([])


@pytest.mark.parametrize(
    ("decay", "rate", "expected"),
    [
        ("none", 0.0, [0.1, 0.1, 0.1, 0.1, 0.1]),
        ("inverse_time", 0.5, [0.1, 0.1 / 1.5, 0.1 / 2.0, 0.1 / 2.5, 0.1 / 3.0]),
        ("exponential", 0.2, [0.1 * math.exp(-0.2 * e) for e in range(5)]),
        ("step", 0.5, [0.1, 0.1, 0.05, 0.05, 0.025]),
    ],
)
def test_lr_decay_schedules(decay: str, rate: float, expected: list[float]) -> None:
    values = [lr_at(0.1, decay, rate, 2, epoch) for epoch in range(5)]
    assert values == pytest.approx(expected)
