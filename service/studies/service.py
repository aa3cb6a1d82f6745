"""Study operations: create, read, list, delete, pause and resume.

Plain functions over a :class:`~caviar.service.db.Database`; the REST API, the CLI, the scheduler and
the workers all call them.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import optuna
from optuna.storages._rdb.models import TrialModel
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from caviar.service.db import Database
from caviar.service.definition import StudyDefinition, StudyTemplate, decode_params
from caviar.service.errors import Conflict, InvalidInput, NotFound, parse_model
from caviar.service.studies.schemas import (
    BestTrial,
    ParetoFront,
    ParetoTrial,
    StudyList,
    StudyRead,
    TrialCounts,
)
from caviar.storage import StudyRecord, utcnow

QUEUE_STATES = ("queued", "running")
"""States in which a study hands out trials."""
QUEUE_ORDER = (StudyRecord.priority.desc(), StudyRecord.created_at, StudyRecord.id)
"""The order workers take studies in: highest priority first, then the oldest."""
_COUNTED = {
    TrialState.WAITING: "waiting",
    TrialState.RUNNING: "running",
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "fail",
}


def parse_definition(data: dict[str, Any], *, prefix: str = "") -> StudyDefinition:
    """Validate a study definition from JSON/YAML data; errors name the field."""
    return parse_model(StudyDefinition, data, prefix=prefix)


_definitions: dict[tuple[int, datetime], StudyDefinition] = {}


def definition_of(record: StudyRecord) -> StudyDefinition:
    """The stored (already validated) definition of a study, parsed once per process.

    Definitions never change after creation; the cache key includes the creation time because
    SQLite may reuse the id of a deleted row.
    """
    key = (record.id, record.created_at)
    definition = _definitions.get(key)
    if definition is None:
        if len(_definitions) > 4096:
            _definitions.clear()
        definition = _definitions[key] = StudyDefinition.model_validate(record.definition)
    return definition


def check_data_access(definition: StudyTemplate, *, data_files: bool) -> None:
    """Refuse a ``file:`` dataset where the caller may not name files.

    Over REST a study may read a ``file:`` dataset only when the service has a data root
    (``CAVIAR_DATA_DIR``): whoever can create a study must not be able to make workers read files
    outside the directory their operator set aside for data.

    Raises:
        InvalidInput: ``file_datasets_disabled``.
    """
    if definition.uses_data_file and not data_files:
        raise InvalidInput(
            "objective.dataset: file: datasets are disabled on this service (CAVIAR_DATA_DIR is unset)",
            code="file_datasets_disabled",
            details=[{"field": "objective.dataset", "message": "file: datasets are disabled"}],
        )


def create_study(
    db: Database, definition: StudyDefinition, *, schedule_id: int | None = None, data_files: bool = True
) -> StudyRecord:
    """Create the caviar study and the Optuna study of the same name.

    Args:
        db: the database.
        definition: the validated definition.
        schedule_id: the schedule that created it, if any.
        data_files: whether the caller may use ``file:`` datasets (see :func:`check_data_access`).

    Raises:
        Conflict: ``name_taken`` when a caviar or Optuna study already has the name.
        InvalidInput: ``file_datasets_disabled``.
    """
    check_data_access(definition, data_files=data_files)
    name = definition.name
    with db.session() as session:
        if session.scalar(select(StudyRecord.id).where(StudyRecord.name == name)) is not None:
            raise Conflict(f"a study named {name!r} already exists", code="name_taken")
    try:
        study_id = db.optuna.create_new_study(definition.study_directions, name)
    except optuna.exceptions.DuplicatedStudyError:
        raise Conflict(f"a study named {name!r} already exists", code="name_taken") from None
    # All or nothing: whatever fails from here on (a value the database refuses, an outage), the
    # Optuna study goes too, so the name is never left blocked by a half-created study.
    try:
        db.optuna.set_study_user_attr(study_id, "caviar:metrics", definition.metrics)
        db.optuna.set_study_user_attr(study_id, "caviar:sampler", definition.sampler_description())
        record = StudyRecord(
            name=name,
            state="queued",
            definition=definition.model_dump(mode="json"),
            priority=definition.priority,
            objective_kind=definition.objective.kind,
            optuna_study_id=study_id,
            schedule_id=schedule_id,
        )
        with db.session() as session, session.begin():
            session.add(record)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            db.optuna.delete_study(study_id)
        if isinstance(exc, IntegrityError):
            raise Conflict(f"a study named {name!r} already exists", code="name_taken") from None
        raise
    return record


def get_record(session: Session, name: str) -> StudyRecord:
    """The study row, or NotFound."""
    record = session.scalar(select(StudyRecord).where(StudyRecord.name == name))
    if record is None:
        raise NotFound(f"no study named {name!r}", code="study_not_found")
    return record


def load_record(db: Database, name: str) -> StudyRecord:
    with db.session() as session:
        return get_record(session, name)


def all_trials(
    db: Database, record: StudyRecord, states: Sequence[TrialState] | None = None
) -> list[FrozenTrial]:
    """The Optuna trials of a study (through Optuna's cached storage)."""
    try:
        return db.optuna.get_all_trials(
            record.optuna_study_id, deepcopy=False, states=tuple(states) if states else None
        )
    except KeyError:
        return []  # the Optuna study was deleted behind caviar's back


def trial_total(db: Database, record: StudyRecord) -> int:
    """How many trials a study has (every state), counted by the database (Optuna's table, read only)."""
    with db.session() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(TrialModel)
                .where(TrialModel.study_id == record.optuna_study_id)
            )
            or 0
        )


def trial_counts(trials: Sequence[FrozenTrial]) -> TrialCounts:
    counts = Counter(_COUNTED[t.state] for t in trials if t.state in _COUNTED)
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


def ranked(definition: StudyDefinition, complete: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Complete single-objective trials, best first (ties: the earlier trial first)."""
    sign = -1.0 if definition.study_directions[0] == StudyDirection.MAXIMIZE else 1.0
    return sorted(complete, key=lambda t: (sign * t.values[0], t.number))


def pareto_front(trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection]) -> list[FrozenTrial]:
    """Non-dominated complete trials, ordered by number."""
    signs = [1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in directions]
    scored = [(t, [s * v for s, v in zip(signs, t.values, strict=True)]) for t in trials]

    def dominated(a: list[float]) -> bool:
        return any(all(x >= y for x, y in zip(b, a, strict=True)) and b != a for _, b in scored)

    return sorted((t for t, score in scored if not dominated(score)), key=lambda t: t.number)


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
    )


def list_studies(
    db: Database,
    *,
    state: str | None = None,
    states: Sequence[str] | None = None,
    tag: str | None = None,
    limit: int = 100,
    offset: int = 0,
    queue_order: bool = False,
) -> StudyList:
    """Studies, newest first (or in the order workers take them), with optional filters.

    ``tag`` is ``key`` or ``key=value``; ``states`` keeps studies in any of these states.
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
    if tag is not None:
        key, _, value = tag.partition("=")
        records = [
            r
            for r in records
            if key in r.definition.get("tags", {}) and (not value or r.definition["tags"][key] == value)
        ]
    page = records[offset : offset + limit]
    return StudyList(items=[describe(db, r) for r in page], total=len(records))


def runnable_studies(
    db: Database, *, kinds: Sequence[str] | None = None, names: Sequence[str] | None = None
) -> list[StudyRecord]:
    """Studies that hand out trials, in queue order; optionally only these objective kinds or names."""
    with db.session() as session:
        query = select(StudyRecord).where(StudyRecord.state.in_(QUEUE_STATES)).order_by(*QUEUE_ORDER)
        if kinds:
            query = query.where(StudyRecord.objective_kind.in_(list(kinds)))
        if names:
            query = query.where(StudyRecord.name.in_(list(names)))
        return list(session.scalars(query))


def count_studies_by_state(db: Database) -> dict[str, int]:
    with db.session() as session:
        rows = session.execute(select(StudyRecord.state, func.count()).group_by(StudyRecord.state)).all()
    return {state: count for state, count in rows}


def delete_study(db: Database, name: str) -> None:
    """Delete a study and all its trials (caviar's record and the Optuna study)."""
    with db.session() as session, session.begin():
        record = get_record(session, name)
        study_id = record.optuna_study_id
        session.delete(record)
    with contextlib.suppress(KeyError):
        db.optuna.delete_study(study_id)


def set_state(session: Session, record: StudyRecord, state: str) -> None:
    record.state = state
    record.updated_at = utcnow()
    session.add(record)


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
