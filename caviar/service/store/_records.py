"""Study records and their trials: look-ups, the parsed definition, compare-and-set state changes.

Plain functions over a :class:`~caviar.service.db.Database`. caviar's study row
(:class:`~caviar.storage.StudyRecord`) is read here; its Optuna trials are read through Optuna's
(cached) storage.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import Label

from caviar.service.db import Database
from caviar.service.definition import StudyDefinition
from caviar.service.errors import NotFound, parse_model
from caviar.service.store import _leases
from caviar.service.store._states import QUEUE_STATES
from caviar.storage import StudyRecord, TrialLease, utcnow

QUEUE_ORDER = (StudyRecord.priority.desc(), StudyRecord.created_at, StudyRecord.id)
"""The order workers take studies in: highest priority first, then the oldest."""


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


# ---- study rows -----------------------------------------------------------------------------


def get_record(session: Session, name: str) -> StudyRecord:
    """The study row, or NotFound (``study_not_found``)."""
    record = session.scalar(select(StudyRecord).where(StudyRecord.name == name))
    if record is None:
        raise NotFound(f"no study named {name!r}", code="study_not_found")
    return record


def load_record(db: Database, name: str) -> StudyRecord:
    """The study row by name, read in a session of its own, or NotFound."""
    with db.session() as session:
        return get_record(session, name)


def reload(db: Database, record: StudyRecord | StudyRef) -> StudyRecord:
    """The study's row as it is now (another process may have edited it), or NotFound."""
    with db.session() as session:
        return still_current(session.get(StudyRecord, record.id), record)


@dataclass(frozen=True)
class StudyRef:
    """What never changes about a study row: its id, name and creation time.

    A process remembers it per name (:func:`study_ref`), so a call that reads the row by id under the
    study lock anyway (an ask) need not look the name up first. It is never trusted alone: the read
    by id checks the name and creation time (:func:`reload`), and a study deleted and created again
    under the same name (in any process) fails that check, which forgets the ref.
    """

    id: int
    name: str
    created_at: datetime
    optuna_study_id: int


_refs: dict[tuple[str, str], StudyRef] = {}
_refs_guard = threading.Lock()


def study_ref(db: Database, name: str) -> StudyRef:
    """The study's immutable identity by name: from this process's memory, else one read."""
    ref = _refs.get((db.url, name))
    if ref is None:
        remember(db, load_record(db, name))
        ref = _refs[(db.url, name)]
    return ref


def remember(db: Database, record: StudyRecord) -> None:
    """Keep a row's identity for :func:`study_ref` (any fresh read of the row may call this)."""
    with _refs_guard:
        if len(_refs) > 4096:
            _refs.clear()
        _refs[(db.url, record.name)] = StudyRef(
            record.id, record.name, record.created_at, record.optuna_study_id
        )


def forget(db: Database, name: str) -> None:
    """Drop a study's remembered identity (its row is gone or is another study's now)."""
    with _refs_guard:
        _refs.pop((db.url, name), None)


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


def set_state(session: Session, record: StudyRecord, state: str) -> None:
    """Set a study's state in the caller's session (the caller holds the row and commits)."""
    record.state = state
    record.updated_at = utcnow()
    session.add(record)


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
    """How many studies are in each state."""
    with db.session() as session:
        rows = session.execute(select(StudyRecord.state, func.count()).group_by(StudyRecord.state)).all()
    return {state: count for state, count in rows}


# ---- trials -----------------------------------------------------------------------------------


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


def complete_trials(db: Database, name: str) -> tuple[StudyRecord, StudyDefinition, list[FrozenTrial]]:
    """A study with its complete trials; NotFound (``no_completed_trials``) when it has none."""
    record = load_record(db, name)
    complete = [t for t in all_trials(db, record, [TrialState.COMPLETE]) if t.values is not None]
    if not complete:
        raise NotFound(f"study {name!r} has no completed trials yet", code="no_completed_trials")
    return record, definition_of(record), complete


def trial_id(db: Database, record: StudyRecord | StudyRef, number: int) -> int:
    """Optuna's id of trial ``number``, or NotFound (``trial_not_found``)."""
    try:
        return db.optuna.get_trial_id_from_study_id_trial_number(record.optuna_study_id, number)
    except KeyError:
        raise no_trial(record.name, number) from None


def no_trial(study: str, number: int) -> NotFound:
    """The error for a trial number a study does not have."""
    return NotFound(f"study {study!r} has no trial {number}", code="trial_not_found")


def record_and_lease(
    db: Database, ref: StudyRef, trial_id: int, *, fresh_for_s: float
) -> tuple[StudyRecord, TrialLease | None, bool]:
    """The study's row as it is now and the lease of one of its trials, in one statement.

    Returns:
        The row, the lease, and whether the lease is active with more than ``fresh_for_s`` seconds
        left by the database's clock.

    Raises:
        NotFound: ``study_not_found`` when the row is gone or is another study's now (``ref`` is stale).
    """
    with db.session() as session:
        row = session.execute(
            select(StudyRecord, TrialLease, _lease_is_fresh(db, fresh_for_s))
            .outerjoin(
                TrialLease, (TrialLease.trial_id == trial_id) & (TrialLease.study_id == StudyRecord.id)
            )
            .where(StudyRecord.id == ref.id)
        ).first() or (None, None, False)  # no row with that id
    return still_current(row[0], ref), row[1], bool(row[2])


def _lease_is_fresh(db: Database, fresh_for_s: float) -> Label[Any]:
    """Whether a lease is active with more than ``fresh_for_s`` seconds left by the database's clock."""
    return and_(
        TrialLease.status == "active",
        TrialLease.expires_at > _leases.fresh_until(db.engine.dialect.name, fresh_for_s),
    ).label("fresh")


def still_current(record: StudyRecord | None, ref: StudyRecord | StudyRef) -> StudyRecord:
    """``record`` as read by ``ref``'s id, or NotFound (``study_not_found``) where the row is gone or
    is another study's now (``ref`` is stale)."""
    if record is None or record.created_at != ref.created_at or record.name != ref.name:
        raise NotFound(f"no study named {ref.name!r}", code="study_not_found")
    return record


def row_and_lease(
    db: Database, name: str, number: int, *, fresh_for_s: float
) -> tuple[StudyRecord, int, TrialLease | None, bool]:
    """A study's row, the id of its trial ``number``, the trial's lease and whether it is fresh
    (:func:`record_and_lease`): one statement when this process knows the study (its identity
    remembered, validated by the row read; a stale one is forgotten and the study looked up again).

    Raises:
        NotFound: ``study_not_found`` or ``trial_not_found``.
    """
    for fresh in (False, True):
        if fresh:
            forget(db, name)
        ref = study_ref(db, name)
        try:
            tid = trial_id(db, ref, number)
            record, lease, lease_fresh = record_and_lease(db, ref, tid, fresh_for_s=fresh_for_s)
        except NotFound:
            if fresh:
                raise
            continue
        return record, tid, lease, lease_fresh
    raise AssertionError("unreachable")  # the second pass returns or raises


LeaseOf = tuple[int, TrialLease | None, bool]
"""A trial's id, its lease and whether the lease is fresh (:func:`record_and_lease`)."""


def row_and_leases(
    db: Database, name: str, numbers: Sequence[int], *, fresh_for_s: float
) -> tuple[StudyRecord, dict[int, LeaseOf]]:
    """:func:`row_and_lease` for several trials of one study (a fused group's epoch of reports): the
    row and all the leases in two statements, not one statement per trial.

    Returns:
        The row, and for each number that names a trial of the study its id, its lease and whether
        the lease is fresh; a number with no trial is left out.

    Raises:
        NotFound: ``study_not_found``.
    """
    for again in (False, True):  # a number not found may be a stale remembered identity's
        if again:
            forget(db, name)
        ref = study_ref(db, name)
        ids: dict[int, int] = {}
        for number in numbers:
            with contextlib.suppress(NotFound):
                ids[number] = trial_id(db, ref, number)
        try:
            record, leases = _record_and_leases(db, ref, sorted(set(ids.values())), fresh_for_s)
        except NotFound:
            if again:
                raise
            continue
        if len(ids) < len(set(numbers)) and not again:
            continue
        return record, {n: (tid, *leases.get(tid, (None, False))) for n, tid in ids.items()}
    raise AssertionError("unreachable")  # the second pass returns or raises


def _record_and_leases(
    db: Database, ref: StudyRef, trial_ids: list[int], fresh_for_s: float
) -> tuple[StudyRecord, dict[int, tuple[TrialLease, bool]]]:
    """The study's row and the leases of ``trial_ids`` with their freshness (two statements)."""
    with db.session() as session:
        record = still_current(session.get(StudyRecord, ref.id), ref)
        rows = session.execute(
            select(TrialLease, _lease_is_fresh(db, fresh_for_s)).where(
                TrialLease.trial_id.in_(trial_ids), TrialLease.study_id == ref.id
            )
        ).all()
    return record, {lease.trial_id: (lease, bool(is_fresh)) for lease, is_fresh in rows}


def trial_number(db: Database, trial_id: int) -> int:
    """The number of a trial by id: from Optuna's trial cache when this process created or read it.

    A trial's number never changes once created, so the cache of Optuna's ``_CachedStorage`` answers
    it without a read (``get_trial_number_from_id`` would load the whole trial, six statements).
    """
    known = getattr(db.optuna, "_trial_id_to_study_id_and_number", {}).get(trial_id)
    if known is not None:
        return int(known[1])
    return db.optuna.get_trial_number_from_id(trial_id)


def frozen(db: Database, record: StudyRecord, number: int) -> FrozenTrial:
    """Trial ``number`` of a study as Optuna has it."""
    return db.optuna.get_trial(trial_id(db, record, number))


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


def utc(moment: datetime | None) -> datetime | None:
    """Optuna stores naive local times; the API speaks UTC."""
    return moment.astimezone(UTC) if moment is not None else None
