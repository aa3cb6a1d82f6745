"""Study results: the best trial or the Pareto front, parameter importances."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from caviar.service.db import Database
from caviar.service.definition import StudyDefinition, decoded_name
from caviar.service.store import (
    all_trials,
    complete_trials,
    definition_of,
    lease_of,
    leases_for,
    load_record,
    pareto_front,
    ranked,
)
from caviar.service.trials.reads import to_read
from caviar.service.trials.schemas import ParetoTrials, TrialRead


def best(db: Database, name: str) -> TrialRead | ParetoTrials:
    """The best complete trial, or the Pareto front of a multi-objective study."""
    _, definition, complete = complete_trials(db, name)
    if definition.multi_objective:
        front = pareto_front(complete, definition.study_directions)
        leases = leases_for(db, [t._trial_id for t in front])
        return ParetoTrials(trials=[to_read(definition, t, leases.get(t._trial_id)) for t in front])
    top = ranked(definition, complete)[0]
    return to_read(definition, top, lease_of(db, top._trial_id))


def importances(db: Database, name: str) -> dict[str, float] | dict[str, dict[str, float]]:
    """Parameter importances by Optuna's default evaluator, with decoded names ({} below 2 trials).

    A multi-objective study has one set per objective, keyed by metric name: the importance of
    each parameter for doing well on that metric (in its direction).
    """
    record = load_record(db, name)
    definition = definition_of(record)
    complete = all_trials(db, record, [TrialState.COMPLETE])
    study = optuna.Study(study_name=record.name, storage=db.optuna) if len(complete) >= 2 else None
    if not definition.multi_objective:
        return _importances(definition, study, None)
    sets: dict[str, dict[str, float]] = {}
    for index, (metric, direction) in enumerate(
        zip(definition.metrics, definition.study_directions, strict=True)
    ):
        # Optuna's evaluator ranks low target values best: negate a maximised metric.
        sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
        target = functools.partial(_objective, index=index, sign=sign)
        sets[metric] = _importances(definition, study, target)
    return sets


def _objective(trial: FrozenTrial, *, index: int, sign: float) -> float:
    return sign * trial.values[index]


def _importances(
    definition: StudyDefinition, study: optuna.Study | None, target: Callable[[FrozenTrial], float] | None
) -> dict[str, float]:
    if study is None:
        return {}  # fewer than two complete trials
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # "computes the importances of params to achieve low target values"
            raw = optuna.importance.get_param_importances(study, target=target)
    except (ValueError, RuntimeError):
        return {}  # e.g. no parameter shared by every complete trial
    return {decoded_name(definition.search_space, key): float(value) for key, value in raw.items()}
