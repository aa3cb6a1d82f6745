"""Search-space parameters and their mapping onto Optuna distributions.

How a value is stored (``reverse_log`` as ``one_minus_<name>``) is :mod:`._codec`'s business.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from optuna.distributions import (
    BaseDistribution,
    CategoricalChoiceType,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from caviar.service.definition._codec import REVERSE_PREFIX, stored_bounds

RESERVED_PREFIXES = (REVERSE_PREFIX, "caviar")

MAX_ABS_FLOAT = 1e30
"""Float bounds and steps stay within +/-1e30, so differences and sums of them stay finite."""
MAX_ABS_INT = 2**53
"""Int bounds stay within +/-2**53 (exact in JSON and in float arithmetic)."""
MAX_STEPS = 10**9
"""A stepped range has at most a billion points."""
MAX_GRID_POINTS = 100_000
"""The grid sampler's whole grid (the product over parameters) has at most this many points."""
PARAM_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"

Choice = str | int | float | bool | None


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    when: dict[str, list[Choice]] | None = Field(
        default=None,
        description="Only sample this parameter when each named categorical parent takes one of the values.",
    )


class FloatParam(_Param):
    """A real-valued parameter."""

    type: Literal["float"]
    low: float = Field(ge=-MAX_ABS_FLOAT, le=MAX_ABS_FLOAT)
    high: float = Field(ge=-MAX_ABS_FLOAT, le=MAX_ABS_FLOAT)
    scale: Literal["linear", "log", "reverse_log"] = "linear"
    step: float | None = Field(default=None, gt=0, le=MAX_ABS_FLOAT)

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        if self.low >= self.high:
            raise ValueError(f"low must be < high (got low={self.low}, high={self.high})")
        if self.step is not None:
            if self.step > self.high - self.low:
                raise ValueError(f"step must be at most high - low (got step={self.step})")
            if (self.high - self.low) / self.step > MAX_STEPS:
                raise ValueError(f"step is too small: at most {MAX_STEPS:.0e} steps between low and high")
        if self.scale == "log" and self.low <= 0:
            raise ValueError(f"scale log needs low > 0 (got low={self.low})")
        if self.scale == "reverse_log" and not (0 <= self.low < self.high < 1):
            raise ValueError(
                f"scale reverse_log needs 0 <= low < high < 1 (got low={self.low}, high={self.high})"
            )
        if self.step is not None and self.scale != "linear":
            raise ValueError("step is only allowed with scale linear")
        return self

    def distribution(self) -> BaseDistribution:
        low, high, log = stored_bounds(self.low, self.high, self.scale)
        return FloatDistribution(low, high, log=log, step=self.step)


class IntParam(_Param):
    """An integer parameter."""

    type: Literal["int"]
    low: StrictInt = Field(ge=-MAX_ABS_INT, le=MAX_ABS_INT)
    high: StrictInt = Field(ge=-MAX_ABS_INT, le=MAX_ABS_INT)
    scale: Literal["linear", "log"] = "linear"
    step: StrictInt = Field(default=1, ge=1, le=MAX_ABS_INT)

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        if self.low >= self.high:
            raise ValueError(f"low must be < high (got low={self.low}, high={self.high})")
        if self.step > self.high - self.low:
            raise ValueError(f"step must be at most high - low (got step={self.step})")
        if self.scale == "log" and self.low < 1:
            raise ValueError(f"scale log needs low >= 1 (got low={self.low})")
        if self.scale == "log" and self.step != 1:
            raise ValueError("scale log needs step 1")
        return self

    def distribution(self) -> BaseDistribution:
        return IntDistribution(self.low, self.high, log=self.scale == "log", step=self.step)


class CategoricalParam(_Param):
    """A parameter drawn from a list of choices."""

    type: Literal["categorical"]
    choices: list[Choice] = Field(min_length=1, max_length=1000)

    @field_validator("choices", mode="before")
    @classmethod
    def _bounded(cls, choices: Any) -> Any:
        for choice in choices if isinstance(choices, list) else []:
            if isinstance(choice, str) and len(choice) > 256:
                raise ValueError("choices are at most 256 characters")
            if isinstance(choice, int) and not isinstance(choice, bool) and abs(choice) > MAX_ABS_INT:
                raise ValueError(f"integer choices stay within +/-2**53 (got {choice})")
        return choices

    @model_validator(mode="after")
    def _check(self) -> CategoricalParam:
        # Optuna finds a choice by equality, so 1, 1.0 and true are the same choice: refuse repeats
        seen: dict[Any, Any] = {}
        for choice in self.choices:
            if isinstance(choice, str) and "\x00" in choice:
                raise ValueError("choices must not contain NUL characters")
            if choice in seen:
                raise ValueError(f"choices must be distinct ({seen[choice]!r} and {choice!r} are equal)")
            seen[choice] = choice
        return self

    def distribution(self) -> BaseDistribution:
        choices: tuple[CategoricalChoiceType, ...] = tuple(self.choices)
        return CategoricalDistribution(choices)


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


def grid_size(param: FloatParam | IntParam | CategoricalParam) -> int:
    """How many values a parameter takes on a grid (a float needs a step)."""
    if isinstance(param, CategoricalParam):
        return len(param.choices)
    if isinstance(param, IntParam):
        return (param.high - param.low) // param.step + 1
    if param.step is None:
        raise ValueError("a float parameter needs a step on a grid")
    return math.floor((param.high - param.low) / param.step + 1e-9) + 1


def sampling_order(space: dict[str, Param]) -> list[str]:
    """Parameter names with every ``when`` parent before its children (the definition is acyclic)."""
    order: list[str] = []
    placed: set[str] = set()

    def place(name: str, trail: tuple[str, ...]) -> None:
        if name in placed:
            return
        if name in trail:
            raise ValueError(f"conditions form a cycle: {' -> '.join((*trail, name))}")
        for parent in space[name].when or {}:
            if parent in space:
                place(parent, (*trail, name))
        placed.add(name)
        order.append(name)

    for name in space:
        place(name, ())
    return order


def is_active(param: Param, values: dict[str, Any]) -> bool:
    """Whether a conditional parameter is sampled, given the decoded values of its parents."""
    return all(
        parent in values and values[parent] in allowed for parent, allowed in (param.when or {}).items()
    )
