"""Parameter sets given by people (enqueued trials, warm starts, an ask's ``fixed`` values), checked
against a search space and encoded for Optuna.

One function, :func:`check_params`, decides whether a set of decoded values (``beta1: 0.95``, as users
see them) fits a search space: every name known, every value of the right type, in range, on the
step grid, among the choices, and the conditions (``when``) respected. It answers the values as
Optuna stores them (through :mod:`._codec`), so nobody else re-implements the encoding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import BaseDistribution

from caviar.service.definition._codec import REVERSE_PREFIX, encode, is_reversed, stored_name
from caviar.service.definition._space import (
    CategoricalParam,
    FloatParam,
    IntParam,
    Param,
    is_active,
    sampling_order,
)
from caviar.service.errors import InvalidInput

_RELATIVE_SLACK = 1e-9
"""How far outside a bound a float may fall (relative to the range) and still count as the bound:
values that went through a decode/encode round trip or a log/exp envelope lose an ulp or two."""
_GRID_SLACK = 1e-8
"""How far from a step-grid point (in steps) a float may be and still count as that point."""


@dataclass(frozen=True)
class CheckedParams:
    """A parameter set that fits a search space.

    Attributes:
        decoded: the values as users see them (``beta1``), snapped onto the space (bounds, grid).
        stored: the values as Optuna stores them (``one_minus_beta1``), by stored name.
        distributions: the Optuna distribution of each stored name.
    """

    decoded: dict[str, Any]
    stored: dict[str, Any]
    distributions: dict[str, BaseDistribution] = field(default_factory=dict)

    def decoded_attrs(self, space: Mapping[str, Param]) -> dict[str, Any]:
        """The user attributes that show reversed parameters decoded (``beta1``) on the dashboard."""
        return {name: value for name, value in self.decoded.items() if is_reversed(space.get(name))}


@dataclass(frozen=True)
class _Problem:
    name: str
    kind: str
    message: str


def check_params(
    space: Mapping[str, Param], decoded: Mapping[str, Any], *, partial: bool = False, where: str = "params"
) -> CheckedParams:
    """Check decoded parameter values against ``space`` and encode them for Optuna.

    Args:
        space: the study's search space.
        decoded: parameter values by user-facing name (``beta1``, never ``one_minus_beta1``).
        partial: a subset of the parameters is fine (an ask's ``fixed`` values): missing ones are not
            an error, and a conditional one is refused only when its parents are given and rule it out.
        where: the field the values came from, for error messages (``trials.2.params``).

    Returns:
        The values snapped onto the space (a bound or grid point an ulp away becomes that point),
        decoded and as Optuna stores them.

    Raises:
        InvalidInput: naming the first bad field (``params.lr: 0.5 is above high 0.1``), with one
            detail per problem; the code is the first problem's kind: ``unknown_parameter``,
            ``missing_parameter``, ``inactive_parameter``, ``invalid_value``, ``out_of_range``,
            ``off_grid`` or ``invalid_choice``.
    """
    problems: list[_Problem] = []
    for name in decoded:
        if name not in space:
            problems.append(_Problem(name, "unknown_parameter", _unknown(space, name)))
    checked: dict[str, Any] = {}
    for name in sampling_order(dict(space)):
        param = space[name]
        parents = (param.when or {}).keys()
        if any(parent in decoded and parent not in checked for parent in parents):
            continue  # a parent's own value is wrong: that is the problem to report
        known = all(parent in checked for parent in parents)
        active = is_active(param, checked)
        if name not in decoded:
            if active and not partial:
                problems.append(_Problem(name, "missing_parameter", _missing(param)))
            continue
        if not active and (known or not partial):
            problems.append(_Problem(name, "inactive_parameter", _inactive(param, checked)))
            continue
        try:
            checked[name] = _check_value(param, decoded[name])
        except ValueError as exc:
            kind, _, message = str(exc).partition(":")
            problems.append(_Problem(name, kind, message.strip()))
    if problems:
        details = [{"field": f"{where}.{p.name}", "message": p.message, "type": p.kind} for p in problems]
        first = details[0]
        raise InvalidInput(f"{first['field']}: {first['message']}", code=problems[0].kind, details=details)
    ordered = {name: checked[name] for name in decoded if name in checked}
    stored = {stored_name(name, space[name]): encode(space[name], value) for name, value in ordered.items()}
    distributions = {stored_name(name, space[name]): space[name].distribution() for name in ordered}
    for key, value in stored.items():  # 1 - x may land an ulp outside the stored bounds
        low, high = getattr(distributions[key], "low", None), getattr(distributions[key], "high", None)
        if isinstance(value, float) and low is not None and high is not None:
            stored[key] = min(max(value, low), high)
    return CheckedParams(decoded=ordered, stored=stored, distributions=distributions)


def _unknown(space: Mapping[str, Param], name: str) -> str:
    if name.startswith(REVERSE_PREFIX) and is_reversed(space.get(name[len(REVERSE_PREFIX) :])):
        user_name = name[len(REVERSE_PREFIX) :]
        return f"not a parameter of the search space: give {user_name!r} as users see it (not 1 - value)"
    return f"not a parameter of the search space (known: {', '.join(space)})"


def _missing(param: Param) -> str:
    if param.when:
        condition = ", ".join(f"{k} in {v!r}" for k, v in param.when.items())
        return f"missing: this parameter is used when {condition}"
    return "missing: every parameter of the search space needs a value"


def _inactive(param: Param, checked: Mapping[str, Any]) -> str:
    condition = ", ".join(f"{k} in {v!r}" for k, v in (param.when or {}).items())
    given = ", ".join(f"{k}={checked[k]!r}" for k in (param.when or {}) if k in checked)
    return f"not used here: its condition ({condition}) is false" + (f" for {given}" if given else "")


def _show(value: Any) -> str:
    """A value for an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _check_value(param: Param, value: Any) -> Any:
    """The value snapped onto the parameter's domain; ValueError("<kind>: <message>") otherwise."""
    if isinstance(param, CategoricalParam):
        return _check_choice(param, value)
    number = _number(value)
    if number is None or not math.isfinite(number):
        kind = "an integer" if isinstance(param, IntParam) else "a finite number"
        raise ValueError(f"invalid_value: must be {kind} (got {_show(value)})")
    if isinstance(param, IntParam):
        if not number.is_integer():
            raise ValueError(f"invalid_value: must be an integer (got {_show(value)})")
        integer = int(number)
        if not param.low <= integer <= param.high:
            raise ValueError(f"out_of_range: {integer} is outside [{param.low}, {param.high}]")
        if (integer - param.low) % param.step:
            raise ValueError(
                f"off_grid: {integer} is not on the grid low + k * step ({param.low} + k * {param.step})"
            )
        return integer
    return _check_float(param, number)


def _check_float(param: FloatParam, number: float) -> float:
    slack = _RELATIVE_SLACK * (param.high - param.low)
    if number < param.low - slack:
        raise ValueError(f"out_of_range: {number} is below low {param.low}")
    if number > param.high + slack:
        raise ValueError(f"out_of_range: {number} is above high {param.high}")
    number = min(max(number, param.low), param.high)
    if param.step is not None:
        k = (number - param.low) / param.step
        if abs(k - round(k)) > _GRID_SLACK:
            raise ValueError(
                f"off_grid: {number} is not on the grid low + k * step ({param.low} + k * {param.step})"
            )
        number = min(param.low + round(k) * param.step, param.high)
    return number


def _check_choice(param: CategoricalParam, value: Any) -> Any:
    for choice in param.choices:
        same_kind = type(choice) is type(value) or (
            _number(choice) is not None and _number(value) is not None
        )
        if same_kind and choice == value:
            return choice
    raise ValueError(f"invalid_choice: {_show(value)} is not one of {_show(param.choices)}")
