"""``pruner: {type: pbt}``: population-based training inside the built-in trainer's fused groups.

PBT is a pruner type (not a separate ``schedule:`` key) because it takes the pruner's place: it
decides, from each trial's per-epoch reports, what happens to the trial while it trains, and a
study has one such policy (ASHA, median, ..., or PBT). ``schedule`` already names caviar's
recurring study runs. The service's own pruner for a PBT study prunes nothing; the worker runs
the exploit/explore steps between the members of each fused group (``caviar.trainer.PBT``).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from caviar.trainer.spec import PERTURBABLE

__all__ = ["PbtOptions", "check_pbt", "parse_options"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Perturb(_Strict):
    """What explore changes, and by how much."""

    params: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=len(PERTURBABLE),
        description="The hyperparameters to perturb (fusible ones in the search space); default: every "
        "fusible float or numeric categorical hyperparameter the search space declares (not seed).",
    )
    factors: list[float] = Field(
        default_factory=lambda: [0.8, 1.2],
        min_length=1,
        max_length=8,
        description="Multipliers, one drawn per hyperparameter (of 1 - value for beta1, beta2, momentum).",
    )

    @field_validator("factors")
    @classmethod
    def _positive(cls, factors: list[float]) -> list[float]:
        for factor in factors:
            if not (math.isfinite(factor) and 0 < factor <= 10):
                raise ValueError(f"factors are numbers in (0, 10] (got {factor})")
        return factors

    @field_validator("params")
    @classmethod
    def _perturbable(cls, params: list[str] | None) -> list[str] | None:
        for name in params or []:
            if name not in PERTURBABLE:
                raise ValueError(
                    f"{name!r} cannot be perturbed within a fused group (perturbable: "
                    f"{', '.join(sorted(PERTURBABLE))})"
                )
        if params is not None and len(set(params)) != len(params):
            raise ValueError("names must be unique")
        return params


class PbtOptions(_Strict):
    """``pruner.options`` of ``type: pbt``."""

    interval: int = Field(default=4, ge=1, le=100_000, description="Epochs between exploit/explore steps.")
    quantile: float = Field(
        default=0.25, gt=0, le=0.5, description="Bottom fraction that copies from the top fraction."
    )
    resample_probability: float = Field(
        default=0.25, ge=0, le=1, description="Chance of a fresh draw from the search space instead."
    )
    perturb: Perturb = Field(default_factory=Perturb)


def parse_options(options: dict[str, Any]) -> PbtOptions:
    """Validate ``pruner.options`` of ``type: pbt``.

    Raises:
        ValueError: Naming the first bad field, as ``options.<field>: <problem>``.
    """
    try:
        return PbtOptions.model_validate(options)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ValueError(f"options.{where}: {error['msg']}") from None


def perturbed_params(options: PbtOptions, space: dict[str, Any]) -> list[str]:
    """The hyperparameters PBT perturbs: the named ones, else every perturbable one in ``space``."""
    if options.perturb.params is not None:
        return list(options.perturb.params)
    return [name for name, param in space.items() if name in PERTURBABLE and _numeric(param)]


def _numeric(param: Any) -> bool:
    kind = getattr(param, "type", None)
    if kind == "float":
        return True
    if kind == "categorical":
        return all(isinstance(c, int | float) and not isinstance(c, bool) for c in param.choices)
    return False


def check_pbt(
    options: dict[str, Any],
    kind: str,
    fuse: int | None,
    max_epochs: int,
    space: dict[str, Any],
    n_objectives: int,
) -> None:
    """Check a PBT pruner against the rest of the definition.

    Raises:
        ValueError: A message that names the field (``pruner...``, ``objective...``).
    """
    parsed = parse_options(options)
    if kind != "trainer":
        raise ValueError(
            f"pruner: pbt runs inside the built-in trainer's fused groups (objective.kind trainer), "
            f"not kind {kind}; use another pruner (asha, median, ...)"
        )
    if fuse is not None and fuse < 2:
        raise ValueError("pruner: pbt needs fused groups of at least 2 trials (objective.fuse >= 2)")
    if n_objectives > 1:
        raise ValueError("pruner: pbt ranks the members of a group by one metric (a single-objective study)")
    if parsed.interval >= max_epochs:
        raise ValueError(
            f"pruner.options.interval: must be less than objective.max_epochs ({max_epochs}), "
            "or no member ever exploits"
        )
    params = perturbed_params(parsed, space)
    if not params:
        raise ValueError(
            "pruner.options.perturb.params: the search space declares no hyperparameter to perturb "
            f"(a float or numeric categorical among {', '.join(sorted(PERTURBABLE))})"
        )
    for name in params:
        if name not in space:
            raise ValueError(f"pruner.options.perturb.params: {name!r} is not in the search space")
        if not _numeric(space[name]):
            raise ValueError(
                f"pruner.options.perturb.params: {name!r} must be a float or numeric categorical parameter"
            )
