"""The one place that knows how parameter values are stored in Optuna and searched.

``reverse_log`` parameters (betas, momentum) are sampled log-uniformly in ``1 - x``: Optuna
stores them as ``one_minus_<name>`` over ``[1 - high, 1 - low]`` with a log distribution, and
caviar decodes them back to ``<name>`` everywhere users look. Every other scale is stored as is.

The functions take any object with a ``scale`` attribute (the search-space parameter models),
so this module depends on nothing else of caviar's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

REVERSE_PREFIX = "one_minus_"


def is_reversed(param: object) -> bool:
    """Whether ``param`` is stored as ``1 - value`` (scale ``reverse_log``)."""
    return getattr(param, "scale", None) == "reverse_log"


def stored_name(name: str, param: object) -> str:
    """The name Optuna stores parameter ``name`` under."""
    return REVERSE_PREFIX + name if is_reversed(param) else name


def encode(param: object, value: Any) -> Any:
    """A decoded (user-facing) value as Optuna stores it."""
    return 1.0 - float(value) if is_reversed(param) else value


def decode(param: object, value: Any) -> Any:
    """A stored value as users see it."""
    return 1.0 - float(value) if is_reversed(param) else value


def stored_bounds(low: float, high: float, scale: str) -> tuple[float, float, bool]:
    """The bounds and log flag of the Optuna distribution of a float parameter."""
    if scale == "reverse_log":
        return 1.0 - high, 1.0 - low, True
    return low, high, scale == "log"


def decode_params(space: Mapping[str, object], stored: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna's stored params -> the decoded params users see (``one_minus_beta1`` -> ``beta1``).

    Parameters outside the search space (a trial enqueued through Optuna, say) pass through.
    """
    decoded: dict[str, Any] = {}
    for key, value in stored.items():
        name = decoded_name(space, key)
        decoded[name] = decode(space[name], value) if name != key else value
    return decoded


def encode_params(space: Mapping[str, object], decoded: Mapping[str, Any]) -> dict[str, Any]:
    """Decoded params -> Optuna's stored names and values (names outside the space pass through)."""
    return {
        stored_name(key, space[key]) if key in space else key: encode(space[key], value)
        if key in space
        else value
        for key, value in decoded.items()
    }


def decoded_name(space: Mapping[str, object], stored: str) -> str:
    """The user-facing name of a stored parameter name."""
    if stored.startswith(REVERSE_PREFIX):
        name = stored[len(REVERSE_PREFIX) :]
        if is_reversed(space.get(name)):
            return name
    return stored


def _identity(x: float) -> float:
    return x


_SEARCH_SCALES: dict[str, tuple[Callable[[float], float], Callable[[float], float]]] = {
    "linear": (_identity, _identity),
    "log": (math.log, math.exp),
    "reverse_log": (lambda x: math.log(1.0 - x), lambda y: 1.0 - math.exp(y)),
}


def search_scale(scale: str) -> tuple[Callable[[float], float], Callable[[float], float]]:
    """``(forward, inverse)``: the map from a value to the space it is sampled uniformly in, and back."""
    return _SEARCH_SCALES[scale]
