"""The parts of a study definition that stand alone: sampler, pruner, budget (with its goal), warm start."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from caviar.service.definition._factories import ASHA_DEFAULTS, PRUNERS, SAMPLERS, build_pruner, check_options
from caviar.service.definition._pbt import parse_options

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SamplerSpec(_Strict):
    """Which Optuna sampler proposes parameters.

    ``{type: auto}`` (the default) chooses one from the study's shape (see ``_auto.choose``);
    ``{type: tpe}`` means Optuna's own defaults.
    """

    type: Literal["auto", "tpe", "random", "qmc", "gp", "cmaes", "grid", "nsga2"] = "auto"
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        kind = info.data.get("type")
        if kind == "auto":
            if options:
                raise ValueError("auto takes no options: it chooses them (name a sampler to set them)")
        elif kind is not None:
            check_options(SAMPLERS[kind], options)
        return options


class PrunerSpec(_Strict):
    """Which pruner stops bad trials early from their per-epoch reports.

    ``asha`` (the default) is asynchronous successive halving: Optuna's SuccessiveHalvingPruner in the
    service, plus in-group ranking on workers that train fused groups. ``pbt`` is population-based
    training inside the built-in trainer's fused groups (options: ``interval``, ``quantile``,
    ``resample_probability``, ``perturb``); it prunes nothing. The others are Optuna's.
    """

    type: Literal[
        "asha",
        "none",
        "median",
        "percentile",
        "successive_halving",
        "hyperband",
        "threshold",
        "patient",
        "wilcoxon",
        "pbt",
    ] = "asha"
    options: dict[str, Any] = Field(default_factory=dict, validate_default=True)

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        kind = info.data.get("type")
        if kind == "pbt":  # population-based training: the worker's, checked in full by _pbt
            parse_options(options)
        elif kind is not None:
            check_options(
                PRUNERS[kind],
                {k: v for k, v in options.items() if not (kind == "patient" and k == "wrapped")},
            )
            try:
                build_pruner(kind, options)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"invalid {kind} pruner options: {exc}") from exc
        if kind == "asha":  # the rungs in effect, as the API shows them and workers read them
            return {**ASHA_DEFAULTS, **options}
        return options


MAX_SECONDS = 366 * 86400
"""Durations (timeouts, deadlines) are at most a year."""
MAX_CHOICES = 20_000
"""All categorical choices of a search space together."""
Scalar = str | int | float | bool | None
"""A JSON scalar: what a hyperparameter value may be."""


class Goal(_Strict):
    """Stop the study once a complete trial reaches this value (single objective, in its direction)."""

    value: float

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class Budget(_Strict):
    """Global limits of a study, exact across every worker and client."""

    n_trials: int = Field(default=100, ge=1, le=1_000_000)
    max_parallel: int | None = Field(default=None, ge=1, le=100_000)
    trial_timeout_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    max_retries: int = Field(default=2, ge=0, le=100)
    max_failed_trials: int = Field(default=10, ge=0, le=1_000_000)
    goal: Goal | None = Field(
        default=None, description="End the study (state stopped) once a complete trial reaches goal.value."
    )
    max_duration_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_SECONDS,
        description="End the study (state stopped) this long after its first trial was claimed.",
    )


class WarmStart(_Strict):
    """Start from another study: enqueue its best complete trials that fit this search space."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    source: str = Field(
        alias="from", pattern=NAME_PATTERN, max_length=128, description="The study to learn from."
    )
    top_k: int = Field(default=10, ge=1, le=1000, description="How many of its best trials to enqueue.")
