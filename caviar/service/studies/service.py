"""Study operations: create (with a warm start), read, list, delete, pause and resume.

Plain functions over a :class:`~caviar.service.db.Database`; the REST API, the CLI, the scheduler and
the workers all call them. Editing and stopping a study live in :mod:`.steering`.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import optuna
from optuna.artifacts import get_all_artifact_meta
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.storages._rdb.models import TrialModel
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState, create_trial
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from caviar.service.db import Database
from caviar.service.definition import (
    CheckedParams,
    StudyDefinition,
    StudyTemplate,
    check_params,
    decode_params,
)
from caviar.service.errors import Conflict, InvalidInput, NotFound, parse_model
from caviar.service.studies.schemas import (
    BestTrial,
    ParetoFront,
    ParetoTrial,
    StudyList,
    StudyRead,
    TrialCounts,
    WarmStartRead,
)
from caviar.storage import StudyRecord, utcnow

_log = logging.getLogger("caviar.studies")

QUEUE_STATES = ("queued", "running")
"""States in which a study hands out trials."""
ACTIVE_STATES = ("queued", "running", "paused")
"""States a study can be stopped, or reach its goal or deadline, in."""
STOPPED_STATES = ("stopping", "stopped")
"""A stop was asked for (by a person, the goal or the deadline): no new trials, running ones end."""
FINAL_STATES = ("completed", "failed", "stopped")
"""States a study stays in unless a person changes its budget (completed, failed)."""
METRIC_NAMES_ATTR = "study:metric_names"
"""Optuna's study system attribute for metric names (what ``Study.set_metric_names`` writes): the
dashboard labels its charts with them."""
WARM_START_FROM = "caviar:warm_start_from"
"""Trial attribute of a warm-start trial: ``<source study>#<trial number>``."""
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


_definitions: dict[tuple[int, datetime, int], StudyDefinition] = {}


def definition_of(record: StudyRecord) -> StudyDefinition:
    """The stored (already validated) definition of a study, parsed once per revision and process.

    The cache key holds the definition's revision (``definition_version``, bumped by every edit), so
    every process sees an edit as soon as it reads the row again; and the creation time, because
    SQLite may reuse the id of a deleted row.
    """
    key = (record.id, record.created_at, record.definition_version or 1)
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

    A definition with ``warm_start`` starts with the best complete trials of that study enqueued
    (see :func:`_warm_start`).

    Raises:
        Conflict: ``name_taken`` when a caviar or Optuna study already has the name.
        InvalidInput: ``file_datasets_disabled``; ``unknown_study`` for a warm start from a study
            that does not exist.
    """
    check_data_access(definition, data_files=data_files)
    name = definition.name
    with db.session() as session:
        if session.scalar(select(StudyRecord.id).where(StudyRecord.name == name)) is not None:
            raise Conflict(f"a study named {name!r} already exists", code="name_taken")
    source = _warm_start_source(db, definition)
    try:
        study_id = db.optuna.create_new_study(definition.study_directions, name)
    except optuna.exceptions.DuplicatedStudyError:
        raise Conflict(f"a study named {name!r} already exists", code="name_taken") from None
    # All or nothing: whatever fails from here on (a value the database refuses, an outage), the
    # Optuna study goes too, so the name is never left blocked by a half-created study.
    try:
        db.optuna.set_study_user_attr(study_id, "caviar:metrics", definition.metrics)
        db.optuna.set_study_system_attr(study_id, METRIC_NAMES_ATTR, definition.metrics)
        db.optuna.set_study_user_attr(study_id, "caviar:sampler", definition.sampler_description())
        # The warm-start trials are enqueued before the caviar study exists, so no ask can come first.
        warm_start = _warm_start(db, study_id, definition, source) if source is not None else None
        record = StudyRecord(
            name=name,
            state="queued",
            definition=definition.model_dump(mode="json"),
            priority=definition.priority,
            objective_kind=definition.objective.kind,
            optuna_study_id=study_id,
            schedule_id=schedule_id,
            warm_start=warm_start,
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


def _warm_start_source(db: Database, definition: StudyDefinition) -> StudyRecord | None:
    if definition.warm_start is None:
        return None
    source = definition.warm_start.source
    with db.session() as session:
        record = session.scalar(select(StudyRecord).where(StudyRecord.name == source))
    if record is None:
        raise InvalidInput(
            f"warm_start.from: no study named {source!r}",
            code="unknown_study",
            details=[{"field": "warm_start.from", "message": f"no study named {source!r}"}],
        )
    return record


_MAX_REASONS = 10


def _warm_start(
    db: Database, study_id: int, definition: StudyDefinition, source: StudyRecord
) -> dict[str, Any]:
    """Enqueue the ``top_k`` best complete trials of ``source`` that fit this study's space.

    Each trial's decoded parameters are kept to this space's names and checked with
    :func:`~caviar.service.definition.check_params`; a trial that does not fit (a value out of the
    narrowed range, a parameter this space needs and the source lacks), repeats parameters
    already enqueued, or would overshoot ``n_trials`` is skipped and counted.

    Returns:
        ``{from, enqueued, skipped, reasons}`` (at most ten reasons, one per skipped trial).
    """
    assert definition.warm_start is not None
    source_definition = definition_of(source)
    complete = [t for t in all_trials(db, source, [TrialState.COMPLETE]) if t.values is not None]
    space = definition.search_space
    seen: set[tuple[tuple[str, Any], ...]] = set()
    enqueued, reasons = 0, []
    top_k = definition.warm_start.top_k
    top = best_first(source_definition, complete, limit=top_k)[:top_k]
    for trial in top:
        decoded = decode_params(source_definition.search_space, trial.params)
        try:
            checked = check_params(space, {k: v for k, v in decoded.items() if k in space})
        except InvalidInput as exc:
            reasons.append({"number": trial.number, "reason": exc.message})
            continue
        key = tuple(sorted(checked.stored.items(), key=lambda item: item[0]))
        if key in seen:
            reasons.append({"number": trial.number, "reason": "same parameters as a better trial"})
            continue
        if enqueued >= definition.budget.n_trials:
            reasons.append({"number": trial.number, "reason": "budget.n_trials reached"})
            continue
        seen.add(key)
        add_trial(db, study_id, space, checked, attrs={WARM_START_FROM: f"{source.name}#{trial.number}"})
        enqueued += 1
    return {
        "from": source.name,
        "enqueued": enqueued,
        "skipped": len(reasons),
        "reasons": reasons[:_MAX_REASONS],
    }


def add_trial(
    db: Database,
    study_id: int,
    space: Mapping[str, Any],
    checked: CheckedParams,
    *,
    values: Sequence[float] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> int:
    """Add a trial with checked parameters to an Optuna study, as Optuna's ``add_trial`` does.

    Without ``values`` it is a waiting trial (Optuna's ``enqueue_trial``: the parameters are its
    ``fixed_params``; the next ask hands it out); with them a complete trial the sampler learns from.
    Either way the decoded reversed parameters are user attributes, so the dashboard shows them.

    Returns:
        The new trial's id.
    """
    user_attrs = {**checked.decoded_attrs(space), **(attrs or {})}
    if values is None:
        template = create_trial(
            state=TrialState.WAITING, system_attrs={"fixed_params": checked.stored}, user_attrs=user_attrs
        )
    else:
        template = create_trial(
            state=TrialState.COMPLETE,
            values=list(values),
            params=checked.stored,
            distributions=checked.distributions,
            user_attrs=user_attrs,
        )
    return db.optuna.create_new_trial(study_id, template_trial=template)


def get_record(session: Session, name: str) -> StudyRecord:
    """The study row, or NotFound."""
    record = session.scalar(select(StudyRecord).where(StudyRecord.name == name))
    if record is None:
        raise NotFound(f"no study named {name!r}", code="study_not_found")
    return record


def load_record(db: Database, name: str) -> StudyRecord:
    with db.session() as session:
        return get_record(session, name)


def reload(db: Database, record: StudyRecord) -> StudyRecord:
    """The study's row as it is now (another process may have edited it), or NotFound."""
    with db.session() as session:
        current = session.get(StudyRecord, record.id)
    if current is None or current.created_at != record.created_at:
        raise NotFound(f"no study named {record.name!r}", code="study_not_found")
    return current


def transition(db: Database, record: StudyRecord, from_states: Sequence[str], to: str, **values: Any) -> bool:
    """Move a study to state ``to`` if it is in one of ``from_states`` now (compare and set).

    Returns:
        Whether this call moved it.
    """
    with db.session() as session, session.begin():
        result = session.execute(
            update(StudyRecord)
            .where(StudyRecord.id == record.id, StudyRecord.state.in_(list(from_states)))
            .values(state=to, updated_at=utcnow(), **values)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


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


def count_states(db: Database, record: StudyRecord) -> dict[TrialState, int]:
    """How many trials of a study are in each state, counted by the database.

    One aggregate over Optuna's trial table (read only; every write still goes through Optuna's
    storage): the ask and the tell check the budget with it instead of loading the history.
    """
    counts = dict.fromkeys(TrialState, 0)
    with db.session() as session:
        rows = session.execute(
            select(TrialModel.state, func.count())
            .where(TrialModel.study_id == record.optuna_study_id)
            .group_by(TrialModel.state)
        )
        for state, count in rows:
            counts[TrialState(state)] += int(count)
    return counts


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


def best_first(
    definition: StudyDefinition, complete: Sequence[FrozenTrial], limit: int | None = None
) -> list[FrozenTrial]:
    """Complete trials, best first: by value, or front by front (Pareto rank) for several objectives.

    ``limit``: at least this many are ranked (the rest may be left out).
    """
    if not definition.multi_objective:
        return ranked(definition, complete)
    ordered: list[FrozenTrial] = []
    rest = list(complete)
    while rest and (limit is None or len(ordered) < limit):
        front = pareto_front(rest, definition.study_directions)
        ordered += front
        taken = {t.number for t in front}
        rest = [t for t in rest if t.number not in taken]
    return ordered


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
    artifact_ids = _artifact_ids(db, record) if artifacts is not None else []
    with db.session() as session, session.begin():
        record = get_record(session, name)
        study_id = record.optuna_study_id
        session.delete(record)
    with contextlib.suppress(KeyError):
        db.optuna.delete_study(study_id)
    removed = 0
    for artifact_id in artifact_ids:
        assert artifacts is not None
        try:
            artifacts.remove(artifact_id)
            removed += 1
        except ArtifactNotFound:
            continue
        except OSError as exc:
            _log.warning("artifact %s of deleted study %s not removed: %s", artifact_id, name, exc)
    return removed


def _artifact_ids(db: Database, record: StudyRecord) -> list[str]:
    """The ids of the Optuna artifacts stored with a study and its trials."""
    try:
        study = optuna.Study(study_name=record.name, storage=db.optuna)
    except KeyError:
        return []
    ids = [meta.artifact_id for meta in get_all_artifact_meta(study, storage=db.optuna)]
    for trial in all_trials(db, record):
        ids += [meta.artifact_id for meta in get_all_artifact_meta(trial, storage=db.optuna)]
    return ids


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
