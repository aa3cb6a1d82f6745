"""What every part of the trial domain shares: attribute names, lookups, the Optuna study handle."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select

from caviar.service.db import Database
from caviar.service.definition import StudyDefinition
from caviar.service.errors import NotFound
from caviar.storage import StudyRecord, TrialLease

# caviar's own trial attributes live under the ``caviar:`` prefix
RETRY_OF = "caviar:retry_of"
ATTEMPT = "caviar:attempt"
FAIL_REASON = "caviar:fail_reason"
RELEASED = "caviar:released"
WORKER = "caviar:worker_id"
ASKED = "caviar:asked"
READY = "caviar:ready"  # system attr: the ask that made this trial finished sampling
CANCELLED = "caviar:cancelled"  # a waiting trial failed because its study stopped
ENQUEUED = "caviar:enqueued"  # a parameter set enqueued over the API
IMPORTED = "caviar:imported"  # a complete trial imported with its known value(s)

STATE_NAMES = {
    TrialState.WAITING: "waiting",
    TrialState.RUNNING: "running",
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "fail",
}
FINISHED_BY_NAME = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "fail": TrialState.FAIL}

_studies: dict[tuple[str, int, str], optuna.Study] = {}


def study_handle(
    db: Database, record: StudyRecord, definition: StudyDefinition, trial_number: int = 0
) -> optuna.Study:
    """The Optuna study with its sampler (seeded for ``trial_number``) and pruner.

    The study handle is loaded once per process and copied per call, so concurrent calls each
    have their own sampler without reading the study row again.
    """
    # the name too: SQLite reuses the id of the newest study once it is deleted
    key = (db.url, record.optuna_study_id, record.name)
    base = _studies.get(key)
    if base is None:
        if len(_studies) > 1024:
            _studies.clear()
        base = _studies[key] = optuna.Study(study_name=record.name, storage=db.optuna)
    study = copy.copy(base)
    study.sampler = definition.sampler_for(trial_number)
    study.pruner = definition.build_pruner()
    return study


def trial_id(db: Database, record: StudyRecord, number: int) -> int:
    """Optuna's id of trial ``number``, or NotFound (``trial_not_found``)."""
    try:
        return db.optuna.get_trial_id_from_study_id_trial_number(record.optuna_study_id, number)
    except KeyError:
        raise NotFound(f"study {record.name!r} has no trial {number}", code="trial_not_found") from None


def frozen(db: Database, record: StudyRecord, number: int) -> FrozenTrial:
    """Trial ``number`` of a study as Optuna has it."""
    return db.optuna.get_trial(trial_id(db, record, number))


def lease_of(db: Database, trial_id: int) -> TrialLease | None:
    """caviar's lease row of a trial (None for a trial created outside caviar)."""
    with db.session() as session:
        return session.get(TrialLease, trial_id)


def leases_for(db: Database, trial_ids: Sequence[int]) -> dict[int, TrialLease]:
    """The lease rows of many trials at once, by trial id."""
    if not trial_ids:
        return {}
    with db.session() as session:
        rows = session.scalars(select(TrialLease).where(TrialLease.trial_id.in_(list(trial_ids))))
        return {lease.trial_id: lease for lease in rows}


def state_counts(trials: Sequence[FrozenTrial]) -> dict[TrialState, int]:
    counts = dict.fromkeys(TrialState, 0)
    for trial in trials:
        counts[trial.state] += 1
    return counts


def used_count(counts: Mapping[TrialState, int]) -> int:
    """Trials that use the budget: complete, pruned, running and waiting ones."""
    return sum(
        counts[s] for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    )


def fail_count(trials: Sequence[FrozenTrial]) -> int:
    """Failed trials that count against ``max_failed_trials`` (hand-backs and cancelled trials do not)."""
    return sum(
        1
        for t in trials
        if t.state == TrialState.FAIL and not t.user_attrs.get(RELEASED) and not t.user_attrs.get(CANCELLED)
    )


def utc(moment: datetime | None) -> datetime | None:
    """Optuna stores naive local times; the API speaks UTC."""
    return moment.astimezone(UTC) if moment is not None else None
