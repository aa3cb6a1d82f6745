"""Study operations: read, list, delete, pause and resume.

Plain functions over a :class:`~caviar.service.db.Database`; the REST API, the CLI, the scheduler and
the workers all call them. Creating a study and its records live in the store
(:mod:`caviar.service.store`); editing and stopping a study in :mod:`.steering`.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Sequence

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select

from caviar.service.db import Database
from caviar.service.definition import StudyDefinition, decode_params
from caviar.service.errors import Conflict
from caviar.service.store import (
    QUEUE_ORDER,
    QUEUE_STATES,
    STATE_NAMES,
    all_trials,
    artifact_ids,
    definition_of,
    get_record,
    load_record,
    pareto_front,
    ranked,
    set_state,
)
from caviar.service.studies.schemas import (
    BestTrial,
    ParetoFront,
    ParetoTrial,
    StudyList,
    StudyRead,
    TrialCounts,
    WarmStartRead,
)
from caviar.storage import StudyRecord

_log = logging.getLogger("caviar.studies")


def trial_counts(trials: Sequence[FrozenTrial]) -> TrialCounts:
    counts = Counter(STATE_NAMES[t.state] for t in trials if t.state in STATE_NAMES)
    return TrialCounts(**counts)


def best_of(definition: StudyDefinition, trials: Sequence[FrozenTrial]) -> BestTrial | ParetoFront | None:
    """Best complete trial (single objective) or the Pareto front (multi-objective)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    if not complete:
        return None
    space = definition.search_space
    directions = definition.study_directions
    if len(directions) == 1:
        best = ranked(definition, complete)[0]
        return BestTrial(number=best.number, value=best.values[0], params=decode_params(space, best.params))
    front = pareto_front(complete, directions)
    return ParetoFront(
        trials=[
            ParetoTrial(number=t.number, values=list(t.values), params=decode_params(space, t.params))
            for t in front
        ]
    )


def describe(db: Database, record: StudyRecord, trials: Sequence[FrozenTrial] | None = None) -> StudyRead:
    """A study with its trial counts and best trial."""
    definition = definition_of(record)
    if trials is None:
        trials = all_trials(db, record)
    return StudyRead(
        name=record.name,
        state=record.state,
        definition=record.definition,
        sampler=definition.sampler_description(),
        trial_counts=trial_counts(trials),
        best=best_of(definition, trials),
        priority=record.priority,
        created_at=record.created_at,
        updated_at=record.updated_at,
        started_at=record.started_at,
        stop_reason=record.stop_reason,
        definition_version=record.definition_version or 1,
        warm_start=WarmStartRead.model_validate(record.warm_start) if record.warm_start else None,
    )


def describe_new(db: Database, record: StudyRecord) -> StudyRead:
    """A study just created: no trials to read unless its warm start enqueued some."""
    return describe(db, record, trials=None if record.warm_start else [])


def list_studies(
    db: Database,
    *,
    state: str | None = None,
    states: Sequence[str] | None = None,
    tags: Sequence[str] = (),
    limit: int = 100,
    offset: int = 0,
    queue_order: bool = False,
) -> StudyList:
    """Studies, newest first (or in the order workers take them), with optional filters.

    Each of ``tags`` is ``key`` or ``key=value`` and a study must carry all of them; ``states`` keeps
    studies in any of these states.
    """
    with db.session() as session:
        query = select(StudyRecord).order_by(
            *(QUEUE_ORDER if queue_order else (StudyRecord.created_at.desc(), StudyRecord.id.desc()))
        )
        if state is not None:
            query = query.where(StudyRecord.state == state)
        if states is not None:
            query = query.where(StudyRecord.state.in_(states))
        records = list(session.scalars(query))
    for tag in tags:
        key, _, value = tag.partition("=")
        records = [
            r
            for r in records
            if key in r.definition.get("tags", {}) and (not value or r.definition["tags"][key] == value)
        ]
    page = records[offset : offset + limit]
    return StudyList(items=[describe(db, r) for r in page], total=len(records))


def delete_study(
    db: Database, name: str, *, artifacts: optuna.artifacts.FileSystemArtifactStore | None = None
) -> int:
    """Delete a study, all its trials and, given the artifact store, the files stored with them.

    The database rows go first: a file that cannot be removed afterwards is logged, never a reason
    to keep a half-deleted study.

    Returns:
        The number of artifact files removed.
    """
    record = load_record(db, name)
    ids = artifact_ids(db, record) if artifacts is not None else []
    with db.session() as session, session.begin():
        record = get_record(session, name)
        study_id = record.optuna_study_id
        session.delete(record)
    with contextlib.suppress(KeyError):
        db.optuna.delete_study(study_id)
    removed = 0
    for artifact_id in ids:
        assert artifacts is not None
        try:
            artifacts.remove(artifact_id)
            removed += 1
        except ArtifactNotFound:
            continue
        except OSError as exc:
            _log.warning("artifact %s of deleted study %s not removed: %s", artifact_id, name, exc)
    return removed


def pause_study(db: Database, name: str) -> StudyRecord:
    """Stop handing out trials; running trials still report and tell."""
    with db.session() as session, session.begin():
        record = get_record(session, name)
        if record.state not in QUEUE_STATES:
            raise Conflict(f"study {name!r} is {record.state} and cannot be paused", code="invalid_state")
        set_state(session, record, "paused")
        return record


def resume_study(db: Database, name: str) -> StudyRecord:
    """Hand out trials again after a pause."""
    with db.session() as session, session.begin():
        record = get_record(session, name)
        if record.state != "paused":
            raise Conflict(f"study {name!r} is {record.state}, not paused", code="invalid_state")
        started = bool(all_trials(db, record))
        set_state(session, record, "running" if started else "queued")
        return record
