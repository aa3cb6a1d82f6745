"""Define-by-run over REST: a running trial's code asks for one parameter at a time.

A declared parameter (in the study's ``search_space``) was sampled when the trial was asked: a
suggest of it checks that the call matches the declaration and answers the stored value. An
undeclared parameter is sampled now, through Optuna's own ``Trial._suggest`` with the study's
sampler (relative sampling included, so TPE, GP and ``auto`` see it), and stored in Optuna's
tables like any other parameter (the dashboard shows it). A retry of a failed trial is enqueued
with every parameter of the failed one, so its suggests answer the same values.
"""

from __future__ import annotations

import json
import math
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    json_to_distribution,
)

from caviar.service.db import Database
from caviar.service.definition import CategoricalParam, FloatParam, IntParam, Param
from caviar.service.definition._space import RESERVED_PREFIXES
from caviar.service.errors import Conflict, InvalidInput
from caviar.service.store import (
    LeasePolicy,
    check_running,
    definition_of,
    frozen,
    load_record,
    renew,
    study_handle,
)
from caviar.service.trials.leases import ANYONE, Caller, check_owner

MAX_NAME_CHARS = 128
MAX_CHOICES = 1000


def suggest(
    db: Database,
    name: str,
    number: int,
    param: str,
    distribution: dict[str, Any],
    *,
    policy: LeasePolicy,
    caller: Caller = ANYONE,
) -> Any:
    """The value of parameter ``param`` for trial ``number``, sampled now if it was not yet.

    Args:
        db: the database.
        name: the study.
        number: the trial (running, and the caller's).
        param: the parameter's name as the code suggests it.
        distribution: Optuna's distribution JSON (``{"name": "FloatDistribution", "attributes":
            {...}}``, as ``optuna.distributions.distribution_to_json`` writes it).
        policy: lease timing (a suggest renews the lease).
        caller: who asks (a trial belongs to the worker that asked for it).

    Raises:
        InvalidInput: ``invalid_distribution``; ``reserved_name``; ``suggest_mismatch`` (a declared
            parameter suggested with another range, scale, step or choices: the message names both);
            ``inactive_parameter`` (a declared conditional parameter this trial does not use);
            ``incompatible_distribution`` (another trial stored the name with another kind).
        Conflict: ``distribution_mismatch`` (this trial stored the name with another distribution),
            ``trial_finished``, ``lease_lost``, ``not_your_trial``.
    """
    dist = parse_distribution(distribution)
    if not param or len(param) > MAX_NAME_CHARS or any(ord(c) < 32 for c in param):
        raise InvalidInput(
            f"name: a parameter name is 1-{MAX_NAME_CHARS} printable characters", code="validation_error"
        )
    record = load_record(db, name)
    definition = definition_of(record)
    trial = frozen(db, record, number)
    lease = check_running(db, record, trial)
    check_owner(record, number, lease, caller)
    declared = definition.search_space.get(param)
    if declared is not None:
        check_declared(param, declared, dist)
        if param not in trial.params:
            raise InvalidInput(
                f"name: {param!r} is declared with a condition ({_when(declared)}) that is false for trial "
                f"{number} (its parameters: {_decoded(trial.params)})",
                code="inactive_parameter",
            )
        return trial.params[param]
    if param.startswith(RESERVED_PREFIXES):
        raise InvalidInput(
            f"name: {param!r}: parameter names may not start with 'one_minus_' or 'caviar'",
            code="reserved_name",
        )
    if param in trial.distributions:
        if trial.distributions[param] != dist:
            raise Conflict(
                f"trial {number} of {name!r} already has {param!r} from {_show(trial.distributions[param])}; "
                f"this suggest asks for {_show(dist)}",
                code="distribution_mismatch",
            )
        return trial.params[param]
    if lease is not None:
        renew(db, trial._trial_id, policy)
    study = study_handle(db, record, definition, trial_number=number)
    try:
        return optuna.Trial(study, trial._trial_id)._suggest(param, dist)
    except ValueError as exc:  # Optuna's storage refuses a distribution another trial stored differently
        raise InvalidInput(f"distribution: {exc}", code="incompatible_distribution") from None


def parse_distribution(data: dict[str, Any]) -> BaseDistribution:
    """Optuna's distribution JSON -> the distribution (a float, int or categorical one).

    Raises:
        InvalidInput: ``invalid_distribution`` naming what is wrong.
    """
    try:
        dist = json_to_distribution(json.dumps(data, allow_nan=False))
        if isinstance(dist, FloatDistribution | IntDistribution):
            float(dist.low) + float(dist.high)  # an int too large for a float raises OverflowError
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        raise InvalidInput(
            f"distribution: not an Optuna distribution ({type(exc).__name__}: {exc})",
            code="invalid_distribution",
        ) from None
    if not isinstance(dist, FloatDistribution | IntDistribution | CategoricalDistribution):
        raise InvalidInput(
            "distribution: a FloatDistribution, IntDistribution or CategoricalDistribution",
            code="invalid_distribution",
        )
    if isinstance(dist, CategoricalDistribution):
        if len(dist.choices) > MAX_CHOICES:
            raise InvalidInput(f"distribution: at most {MAX_CHOICES} choices", code="invalid_distribution")
        if any(not isinstance(c, str | int | float | bool | type(None)) for c in dist.choices):
            raise InvalidInput("distribution: choices are JSON scalars", code="invalid_distribution")
    elif not all(math.isfinite(float(v)) for v in (dist.low, dist.high)):
        raise InvalidInput("distribution: low and high are finite numbers", code="invalid_distribution")
    return dist


def check_declared(name: str, declared: Param, dist: BaseDistribution) -> None:
    """Refuse a suggest of a declared parameter that does not match its declaration.

    Raises:
        InvalidInput: ``suggest_mismatch``, with the call and the declaration in the message.
    """
    if isinstance(declared, FloatParam) and declared.scale == "reverse_log":
        raise InvalidInput(
            f"name: {name!r} is declared with scale reverse_log ({_declaration(declared)}), which no "
            f"suggest call expresses; this call asked for {_call(name, dist)}. Read trial.params[{name!r}]",
            code="suggest_mismatch",
        )
    if declared.distribution() != dist:
        raise InvalidInput(
            f"name: {_call(name, dist)} does not match the declaration of {name!r} in the search space "
            f"({_declaration(declared)})",
            code="suggest_mismatch",
        )


def _call(name: str, dist: BaseDistribution) -> str:
    """A distribution as the suggest call that asks for it."""
    if isinstance(dist, FloatDistribution):
        return f"suggest_float({name!r}, {dist.low!r}, {dist.high!r}, step={dist.step!r}, log={dist.log})"
    if isinstance(dist, IntDistribution):
        return f"suggest_int({name!r}, {dist.low!r}, {dist.high!r}, step={dist.step!r}, log={dist.log})"
    if isinstance(dist, CategoricalDistribution):
        return f"suggest_categorical({name!r}, {list(dist.choices)!r})"
    return f"{name!r} from {dist!r}"


def _declaration(declared: Param) -> str:
    fields = declared.model_dump(exclude_none=True, exclude={"when"})
    if isinstance(declared, IntParam | FloatParam) and declared.scale == "linear":
        fields.pop("scale", None)
    if isinstance(declared, CategoricalParam):
        return f"type: categorical, choices: {declared.choices!r}"
    return ", ".join(f"{k}: {v}" for k, v in fields.items())


def _show(dist: BaseDistribution) -> str:
    return _call("", dist).replace("'', ", "")


def _when(declared: Param) -> str:
    return ", ".join(f"{k} in {v!r}" for k, v in (declared.when or {}).items())


def _decoded(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items()) or "none"
