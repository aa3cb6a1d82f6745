"""Population-based training (PBT) inside a fused group: who exploits whom, and how to explore.

Every ``interval`` of its own epochs a member of a fused group is ranked against the group's live
members by its last reported score. A member in the bottom ``quantile`` copies the weights and
optimizer state of a random member of the top ``quantile`` (exploit; :func:`train_group` does the
tensor copies between member slices) and takes that member's hyperparameters, perturbed (explore):

* with probability ``resample_probability`` a value is drawn afresh from its search-space range
  (on the range's own scale: ``log``, ``reverse_log`` or ``linear``);
* else it is multiplied by one of ``factors`` (Ray Tune's 0.8 / 1.2) on the hyperparameter's
  natural scale: ``1 - value`` for the decay rates (``beta1``, ``beta2``, ``momentum``: the
  reverse-log scale), the value itself for the rest (``lr``, ``weight_decay``, ``dropout``, ...);
  a categorical value moves to a neighbouring choice;
* the result is clamped into the range (and snapped to its ``step``).

This module is pure Python (no torch), so the policy is testable on its own.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .spec import PERTURBABLE, REVERSED, TrialConfig

__all__ = ["PBT", "Dimension", "Exploit", "Population", "explore", "quantiles"]

SCALES = ("linear", "log", "reverse_log")


@dataclass(frozen=True)
class Dimension:
    """A hyperparameter PBT perturbs, with its search-space range.

    Attributes:
        name: A :data:`PERTURBABLE` hyperparameter.
        low: Lower bound (ranges), ``None`` for choices.
        high: Upper bound (ranges), ``None`` for choices.
        scale: Resampling scale of a range: ``linear``, ``log`` or ``reverse_log``.
        step: Grid step of a linear range, or ``None``.
        choices: The values of a categorical dimension (numbers, in the search space's order).
    """

    name: str
    low: float | None = None
    high: float | None = None
    scale: str = "linear"
    step: float | None = None
    choices: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.name not in PERTURBABLE:
            raise ValueError(f"{self.name!r} is not a hyperparameter PBT can perturb: {sorted(PERTURBABLE)}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if self.choices is not None:
            if not self.choices:
                raise ValueError(f"{self.name}: choices must not be empty")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.name}: a range needs low < high (got {self.low}, {self.high})")


@dataclass(frozen=True)
class PBT:
    """PBT settings of a fused group (see the module docstring).

    Attributes:
        dimensions: The hyperparameters to perturb.
        interval: Epochs between two exploit/explore steps of a member (its own epochs).
        quantile: Fraction of the group in the bottom (and top) quantile, in ``(0, 0.5]``.
        factors: Perturbation factors, one chosen at random per hyperparameter.
        resample_probability: Chance of drawing a hyperparameter afresh instead of perturbing it.
        seed: Seed of the choices (donor, factors, resamples).
        maximize: Whether a higher score is better; ``None``: only for ``val_accuracy``.
    """

    dimensions: tuple[Dimension, ...]
    interval: int = 4
    quantile: float = 0.25
    factors: tuple[float, ...] = (0.8, 1.2)
    resample_probability: float = 0.25
    seed: int = 0
    maximize: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {self.interval!r}")
        if not 0 < self.quantile <= 0.5:
            raise ValueError(f"quantile must be in (0, 0.5], got {self.quantile!r}")
        if not self.factors or any(not (math.isfinite(f) and f > 0) for f in self.factors):
            raise ValueError(f"factors must be positive finite numbers, got {self.factors!r}")
        if not 0 <= self.resample_probability <= 1:
            raise ValueError(f"resample_probability must be in [0, 1], got {self.resample_probability!r}")


@dataclass(frozen=True)
class Exploit:
    """One exploit/explore step of a member (its lineage entry).

    Attributes:
        member: The member that copied (its index in :func:`train_group`'s configs).
        parent: The member it copied weights and optimizer state from.
        step: The member's epochs done when it copied (its next report is at this step).
        score: The member's score before copying.
        parent_score: The parent's score.
        old: The member's perturbed hyperparameters before.
        new: Its hyperparameters after (the parent's, perturbed).
    """

    member: int
    parent: int
    step: int
    score: float
    parent_score: float
    old: dict[str, float]
    new: dict[str, float]


def quantiles(
    scores: Sequence[float], quantile: float, higher_is_better: bool
) -> tuple[list[int], list[int]]:
    """Positions of the bottom and top ``quantile`` of ``scores`` (Ray Tune's rule).

    ``ceil(n * quantile)`` members each, at most ``floor(n / 2)``; none when ``n <= 1``. A
    non-finite score ranks last; ties keep position order (deterministic).

    Returns:
        ``(bottom, top)``: positions, worst first and best last.
    """
    n = len(scores)
    if n <= 1:
        return [], []

    def key(i: int) -> float:
        s = scores[i]
        if not math.isfinite(s):
            return -math.inf
        return s if higher_is_better else -s

    order = sorted(range(n), key=key)  # worst first
    count = min(math.ceil(n * quantile), n // 2)
    return order[:count], order[n - count :]


def _clamp(value: float, dim: Dimension) -> float:
    assert dim.low is not None and dim.high is not None
    value = min(max(value, dim.low), dim.high)
    if dim.step is not None:
        value = dim.low + round((value - dim.low) / dim.step) * dim.step
        value = min(value, dim.high)
    return value


def _resample(dim: Dimension, rng: random.Random) -> float:
    if dim.choices is not None:
        return float(rng.choice(dim.choices))
    assert dim.low is not None and dim.high is not None
    if dim.scale == "log":
        value = math.exp(rng.uniform(math.log(dim.low), math.log(dim.high)))
    elif dim.scale == "reverse_log":
        value = 1.0 - math.exp(rng.uniform(math.log(1.0 - dim.high), math.log(1.0 - dim.low)))
    else:
        value = rng.uniform(dim.low, dim.high)
    return _clamp(value, dim)


def _perturb(dim: Dimension, value: float, factor: float) -> float:
    if dim.choices is not None:
        choices = list(dim.choices)
        index = min(range(len(choices)), key=lambda i: abs(choices[i] - value))
        index += 1 if factor > 1 else -1 if factor < 1 else 0
        return float(choices[min(max(index, 0), len(choices) - 1)])
    if dim.name in REVERSED:
        return _clamp(1.0 - (1.0 - value) * factor, dim)
    return _clamp(value * factor, dim)


def explore(
    values: Mapping[str, float],
    dimensions: Sequence[Dimension],
    factors: Sequence[float],
    resample_probability: float,
    rng: random.Random,
) -> dict[str, float]:
    """New values of ``dimensions``: each resampled or perturbed from ``values`` (the parent's).

    Args:
        values: Current values by name.
        dimensions: What to perturb, with ranges.
        factors: Perturbation factors (one drawn per dimension).
        resample_probability: Chance of a fresh draw from the range instead.
        rng: The random stream.

    Returns:
        ``{name: new value}`` for every dimension.
    """
    new: dict[str, float] = {}
    for dim in dimensions:
        if rng.random() < resample_probability:
            new[dim.name] = _resample(dim, rng)
        else:
            new[dim.name] = _perturb(dim, float(values[dim.name]), rng.choice(list(factors)))
    return new


class Population:
    """A group's PBT state: its settings, random stream and lineage listener.

    Args:
        config: The settings.
        on_exploit: Called with every :class:`Exploit` (to record lineage) as it happens.
    """

    def __init__(self, config: PBT, on_exploit: Callable[[Exploit], None] | None = None) -> None:
        self.config = config
        self.on_exploit = on_exploit
        self.rng = random.Random(config.seed)

    def plan(
        self,
        members: Sequence[int],
        epochs_done: Sequence[int],
        scores: Sequence[float],
        configs: Sequence[TrialConfig],
        higher_is_better: bool,
    ) -> list[tuple[int, int, TrialConfig, Exploit]]:
        """Decide this epoch's exploits among the live members that go on training.

        Args:
            members: Member index of each position.
            epochs_done: Each member's own epochs done.
            scores: Each member's last score.
            configs: Each member's current config.
            higher_is_better: Whether a higher score is better.

        Returns:
            ``(position, parent position, new config, lineage entry)`` for every member that
            exploits now: due (its epochs done a multiple of ``interval``), in the bottom quantile,
            and strictly worse than the top-quantile parent chosen at random.
        """
        cfg = self.config
        bottom, top = quantiles(scores, cfg.quantile, higher_is_better)
        plans: list[tuple[int, int, TrialConfig, Exploit]] = []
        for pos in bottom:
            if epochs_done[pos] % cfg.interval != 0:
                continue
            parent = self.rng.choice(top)
            a, b = scores[pos], scores[parent]
            better = not math.isfinite(a) or (b > a if higher_is_better else b < a)
            if not math.isfinite(b) or not better:
                continue
            source = configs[parent]
            values = explore(
                {d.name: getattr(source, d.name) for d in cfg.dimensions},
                cfg.dimensions,
                cfg.factors,
                cfg.resample_probability,
                self.rng,
            )
            own = {**source.to_params(), "seed": configs[pos].seed}
            try:
                new_config = TrialConfig.from_params({**own, **values})
            except ValueError:  # a value the trainer refuses (a range wider than its own): no explore
                new_config = TrialConfig.from_params(own)
            event = Exploit(
                member=members[pos],
                parent=members[parent],
                step=epochs_done[pos],
                score=a,
                parent_score=b,
                old={d.name: float(getattr(configs[pos], d.name)) for d in cfg.dimensions},
                new={d.name: float(getattr(new_config, d.name)) for d in cfg.dimensions},
            )
            plans.append((pos, parent, new_config, event))
        return plans
