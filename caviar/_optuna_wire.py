"""Optuna's trials and studies as JSON, shared by ``caviar.optuna_storage`` and the service.

JSON has no infinity or NaN while Optuna allows them in values, intermediate values and attributes:
numbers travel through :func:`num_out`/:func:`num_in` (a non-finite float is the string ``"inf"``,
``"-inf"`` or ``"nan"``) and attributes as JSON text written by Python's ``json`` (as Optuna's RDB
storage stores them). Distributions travel as Optuna's ``distribution_to_json`` text, datetimes as
ISO 8601 text (Optuna's naive local times).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from optuna.distributions import distribution_to_json, json_to_distribution
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def num_out(value: float) -> float | str:
    """A float for JSON: itself, or ``"inf"``/``"-inf"``/``"nan"``."""
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def num_in(value: float | str) -> float:
    """The float that :func:`num_out` wrote."""
    if isinstance(value, str):
        return _NON_FINITE[value]
    return float(value)


def time_out(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def time_in(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text is not None else None


def attrs_out(attrs: dict[str, Any]) -> str:
    return json.dumps(attrs)


def attrs_in(text: str) -> dict[str, Any]:
    loaded = json.loads(text)
    if not isinstance(loaded, dict):
        raise ValueError("attributes must be a JSON object")
    return loaded


def trial_out(trial: FrozenTrial, study_id: int | None = None) -> dict[str, Any]:
    """A trial (or a template of one) as JSON; parameters keep their order."""
    data: dict[str, Any] = {
        "state": trial.state.name,
        "values": [num_out(v) for v in trial.values] if trial.values is not None else None,
        "datetime_start": time_out(trial.datetime_start),
        "datetime_complete": time_out(trial.datetime_complete),
        "params": [
            {
                "name": name,
                "internal": num_out(trial.distributions[name].to_internal_repr(value)),
                "distribution": distribution_to_json(trial.distributions[name]),
            }
            for name, value in trial.params.items()
        ],
        "user_attrs_json": attrs_out(trial.user_attrs),
        "system_attrs_json": attrs_out(trial.system_attrs),
        "intermediate_values": [[step, num_out(v)] for step, v in trial.intermediate_values.items()],
    }
    if study_id is not None:
        data["trial_id"] = trial._trial_id
        data["study_id"] = study_id
        data["number"] = trial.number
    return data


def trial_in(data: dict[str, Any]) -> FrozenTrial:
    """The trial that :func:`trial_out` wrote (a template has number and id -1)."""
    params: dict[str, Any] = {}
    distributions = {}
    for param in data.get("params") or []:
        distribution = json_to_distribution(param["distribution"])
        distributions[param["name"]] = distribution
        params[param["name"]] = distribution.to_external_repr(num_in(param["internal"]))
    values = data.get("values")
    return FrozenTrial(
        number=int(data.get("number", -1)),
        state=TrialState[data["state"]],
        value=None,
        values=[num_in(v) for v in values] if values is not None else None,
        datetime_start=time_in(data.get("datetime_start")),
        datetime_complete=time_in(data.get("datetime_complete")),
        params=params,
        distributions=distributions,
        user_attrs=attrs_in(data.get("user_attrs_json") or "{}"),
        system_attrs=attrs_in(data.get("system_attrs_json") or "{}"),
        intermediate_values={int(step): num_in(v) for step, v in data.get("intermediate_values") or []},
        trial_id=int(data.get("trial_id", -1)),
    )


def values_out(values: Sequence[float] | None) -> list[float | str] | None:
    return [num_out(v) for v in values] if values is not None else None


def values_in(values: Sequence[float | str] | None) -> list[float] | None:
    return [num_in(v) for v in values] if values is not None else None


def study_out(study: FrozenStudy) -> dict[str, Any]:
    return {
        "study_id": study._study_id,
        "study_name": study.study_name,
        "directions": [d.name for d in study.directions],
        "user_attrs_json": attrs_out(study.user_attrs),
        "system_attrs_json": attrs_out(study.system_attrs),
    }


def study_in(data: dict[str, Any]) -> FrozenStudy:
    return FrozenStudy(
        study_name=data["study_name"],
        direction=None,
        directions=[StudyDirection[d] for d in data["directions"]],
        user_attrs=attrs_in(data["user_attrs_json"]),
        system_attrs=attrs_in(data["system_attrs_json"]),
        study_id=int(data["study_id"]),
    )
