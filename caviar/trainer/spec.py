"""The trainer's contract: what one training run is defined by, and what it reports.

Everything the tuning service must know about the trainer is declared here once: the
hyperparameters (:class:`TrialConfig`'s fields), which of them may differ within a fused group,
the models, the built-in datasets and the reported metrics. The service reads this module to
validate study definitions, so it imports only the standard library (never torch).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DATASETS",
    "FUSIBLE",
    "HYPERPARAMETERS",
    "METRICS",
    "MODELS",
    "PERTURBABLE",
    "REVERSED",
    "SHARED",
    "TUNABLE",
    "TrialConfig",
    "check_group",
    "lr_at",
]

MODELS = ("mlp", "cnn")
"""Model families; the CNN needs an image dataset."""
DATASETS = ("digits", "breast_cancer", "wine", "synthetic")
"""Built-in datasets (shipped with scikit-learn or generated: nothing is downloaded)."""
IMAGE_DATASETS = ("digits",)
"""Built-in datasets whose samples are images (the CNN's inputs)."""
METRICS = ("val_accuracy", "val_loss", "train_loss")
"""What a training run reports, per epoch and at its end."""
INITS = ("he", "xavier")
OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam", "adamw")
LR_DECAYS = ("none", "inverse_time", "exponential", "step")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True, slots=True)
class TrialConfig:
    """Hyperparameters of one training run.

    Attributes:
        model: ``"mlp"`` or ``"cnn"`` (the CNN needs an image dataset).
        layers: Number of hidden layers (MLP: hidden linear layers; CNN: conv blocks). The
            classifier head comes on top.
        hidden_units: MLP: width of each hidden layer. CNN: output channels of each conv layer.
        batch_norm: Batch normalisation after each hidden layer (before the ReLU).
        dropout: Inverted-dropout rate after each hidden activation, in ``[0, 1)``.
        init: Weight initialisation, ``"he"`` (normal, std ``sqrt(2 / fan_in)``) or ``"xavier"``
            (uniform, bound ``sqrt(6 / (fan_in + fan_out))``). Biases start at zero.
        optimizer: ``"sgd"``, ``"momentum"`` (heavy ball), ``"rmsprop"`` (squared-gradient decay
            ``beta2``), ``"adam"`` or ``"adamw"``.
        lr: Base learning rate, ``> 0``.
        momentum: Heavy-ball coefficient for ``"momentum"``, in ``[0, 1)``.
        beta1: Adam first-moment decay, in ``[0, 1)``.
        beta2: Adam second-moment decay (also RMSProp's decay), in ``[0, 1)``.
        eps: Denominator epsilon of RMSProp/Adam, ``> 0``.
        lr_decay: Learning-rate schedule over epochs, see :func:`lr_at`.
        lr_decay_rate: Schedule rate, ``>= 0`` (``"step"``: the factor, in ``(0, 1]``).
        lr_decay_steps: Epochs per step of the ``"step"`` schedule, ``>= 1``.
        weight_decay: L2 coefficient, ``>= 0``; added to the gradient (``wd * w``), decoupled
            (``w -= lr * wd * w``) for ``"adamw"``.
        l1: L1 coefficient, ``>= 0``; subgradient ``l1 * sign(w)`` added to the gradient.
        batch_size: Mini-batch size, ``>= 1``.
        max_epochs: Epoch budget, ``>= 1``.
        patience: Early stopping after this many epochs without a lower validation loss; the
            best epoch's weights are restored. ``0`` disables early stopping.
        augment: Augmentation strength, ``>= 0`` (training only). Gaussian noise with this
            standard deviation on the normalised inputs; image datasets also get random shifts
            of up to ``ceil(augment)`` pixels.
        seed: Seed of initialisation, shuffling, dropout and augmentation noise.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    """

    model: str = "mlp"
    layers: int = 2
    hidden_units: int = 128
    batch_norm: bool = False
    dropout: float = 0.0
    init: str = "he"
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    lr_decay: str = "none"
    lr_decay_rate: float = 0.0
    lr_decay_steps: int = 10
    weight_decay: float = 0.0
    l1: float = 0.0
    batch_size: int = 64
    max_epochs: int = 20
    patience: int = 0
    augment: float = 0.0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        """Validate every field; raise ``ValueError`` naming the first bad one."""
        _check_choice("model", self.model, MODELS)
        _check_choice("init", self.init, INITS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("lr_decay", self.lr_decay, LR_DECAYS)
        if not isinstance(self.batch_norm, bool):
            raise ValueError(f"batch_norm must be a bool, got {self.batch_norm!r}")
        for name, low in (("layers", 1), ("hidden_units", 1), ("lr_decay_steps", 1), ("batch_size", 1)):
            _check_int(name, getattr(self, name), low)
        _check_int("max_epochs", self.max_epochs, 1)
        _check_int("patience", self.patience, 0)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        for name in ("lr", "eps"):
            value = _check_float(name, getattr(self, name))
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name in ("dropout", "momentum", "beta1", "beta2"):
            value = _check_float(name, getattr(self, name))
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        for name in ("lr_decay_rate", "weight_decay", "l1", "augment"):
            value = _check_float(name, getattr(self, name))
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.lr_decay == "step" and not 0 < self.lr_decay_rate <= 1:
            raise ValueError(f"lr_decay_rate must be in (0, 1] for lr_decay='step', got {self.lr_decay_rate}")
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> TrialConfig:
        """Build a config from a study trial's parameters.

        Args:
            params: Field name to value; missing fields keep their defaults. Integral floats
                given for int fields (as samplers may produce) are converted.

        Returns:
            The validated config.

        Raises:
            ValueError: On an unknown key (named) or an invalid value.
        """
        kwargs: dict[str, Any] = {}
        for key, value in params.items():
            if key not in _FIELD_TYPES:
                raise ValueError(f"unknown hyperparameter {key!r}; known: {', '.join(sorted(_FIELD_TYPES))}")
            kind = _FIELD_TYPES[key]
            if kind == "int" and isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(f"{key} must be an int, got {value!r}")
                value = int(value)
            elif kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            kwargs[key] = value
        return cls(**kwargs)

    def to_params(self) -> dict[str, Any]:
        """Return the config as a plain ``{field: value}`` dict (inverse of :meth:`from_params`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


_FIELD_TYPES: dict[str, str] = {
    f.name: {"int": "int", "float": "float", "bool": "bool"}.get(str(f.type), "str")
    for f in dataclasses.fields(TrialConfig)
}

HYPERPARAMETERS: frozenset[str] = frozenset(_FIELD_TYPES)
"""Every :class:`TrialConfig` field name."""

FUSIBLE: frozenset[str] = frozenset(
    {
        "lr",
        "momentum",
        "beta1",
        "beta2",
        "eps",
        "weight_decay",
        "l1",
        "dropout",
        "lr_decay_rate",
        "augment",
        "seed",
    }
)
"""Fields in which the members of one fused group may differ."""

PERTURBABLE: frozenset[str] = FUSIBLE - {"seed"}
"""Hyperparameters population-based training may perturb within a fused group."""

REVERSED: frozenset[str] = frozenset({"beta1", "beta2", "momentum"})
"""Decay rates near 1: population-based training perturbs ``1 - value`` (the reverse-log scale)."""

SHARED: frozenset[str] = HYPERPARAMETERS - FUSIBLE
"""Fields the members of one fused group must agree on."""

TUNABLE: frozenset[str] = HYPERPARAMETERS - {"model", "max_epochs", "device"}
"""The hyperparameters a study may search or hold fixed (the rest come from its objective)."""


def check_group(configs: Sequence[TrialConfig]) -> None:
    """Check that configs can train as one fused group.

    Args:
        configs: The members, at least one.

    Raises:
        ValueError: When empty, or when members differ in a non-fusible field (named).
    """
    if not configs:
        raise ValueError("a group needs at least one config")
    first = configs[0]
    for index, config in enumerate(configs):
        if not isinstance(config, TrialConfig):
            raise ValueError(f"member {index} is not a TrialConfig: {config!r}")
        for name in sorted(SHARED):
            if getattr(config, name) != getattr(first, name):
                raise ValueError(
                    f"{name} differs within the group (member 0: {getattr(first, name)!r}, "
                    f"member {index}: {getattr(config, name)!r}); only fusible fields may differ: "
                    + ", ".join(sorted(FUSIBLE))
                )


def lr_at(lr: float, lr_decay: str, lr_decay_rate: float, lr_decay_steps: int, epoch: int) -> float:
    """Learning rate of a schedule at an epoch (0-based; epoch 0 uses ``lr``).

    * ``"none"``: ``lr``
    * ``"inverse_time"``: ``lr / (1 + rate * epoch)``
    * ``"exponential"``: ``lr * exp(-rate * epoch)``
    * ``"step"``: ``lr * rate ** (epoch // steps)``

    Args:
        lr: Base learning rate.
        lr_decay: Schedule name.
        lr_decay_rate: Schedule rate.
        lr_decay_steps: Epochs per step (``"step"`` only).
        epoch: 0-based epoch index.

    Returns:
        The learning rate used throughout that epoch.
    """
    if lr_decay == "none":
        return lr
    if lr_decay == "inverse_time":
        return lr / (1.0 + lr_decay_rate * epoch)
    if lr_decay == "exponential":
        return lr * math.exp(-lr_decay_rate * epoch)
    if lr_decay == "step":
        return lr * lr_decay_rate ** (epoch // lr_decay_steps)
    raise ValueError(f"lr_decay must be one of {', '.join(LR_DECAYS)}, got {lr_decay!r}")
