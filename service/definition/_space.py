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
from pydantic import BaseModel, ConfigDict, Field, model_validator

from caviar.service.definition._codec import REVERSE_PREFIX, stored_bounds

RESERVED_PREFIXES = (REVERSE_PREFIX, "caviar")
PARAM_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"

Choice = str | int | float | bool | None


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid")

    when: dict[str, list[Choice]] | None = Field(
        default=None,
        description="Only sample this parameter when each named categorical parent takes one of the values.",
    )


class FloatParam(_Param):
    """A real-valued parameter."""

    type: Literal["float"]
    low: float
    high: float
    scale: Literal["linear", "log", "reverse_log"] = "linear"
    step: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        if self.low >= self.high:
            raise ValueError(f"low must be < high (got low={self.low}, high={self.high})")
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
    low: int
    high: int
    scale: Literal["linear", "log"] = "linear"
    step: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        if self.low >= self.high:
            raise ValueError(f"low must be < high (got low={self.low}, high={self.high})")
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

    @model_validator(mode="after")
    def _check(self) -> CategoricalParam:
        seen: list[Any] = []
        for choice in self.choices:
            if any(type(choice) is type(other) and choice == other for other in seen):
                raise ValueError(f"choices must be unique (repeated {choice!r})")
            if isinstance(choice, float) and not math.isfinite(choice):
                raise ValueError("choices must be finite")
            seen.append(choice)
        return self

    def distribution(self) -> BaseDistribution:
        choices: tuple[CategoricalChoiceType, ...] = tuple(self.choices)
        return CategoricalDistribution(choices)


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


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
