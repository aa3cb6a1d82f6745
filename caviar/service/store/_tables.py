"""Read-only aggregates over Optuna's trial table, and two grouped writes: the ONLY use of Optuna's
private models, loader and write helpers.

Optuna owns its tables and every write goes through its storage's code; counting in SQL, and
finding the few running trials without a lease, is what its API cannot do cheaply (it loads the
trials), and its API commits every user attribute and every intermediate value on its own (a tell
carries several attributes, a fused group's epoch several values). Should Optuna rename its models
or helpers, this is the one file to change.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._rdb.models import TrialModel, TrialUserAttributeModel
from optuna.storages._rdb.storage import RDBStorage, _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from caviar.service.db import Database
from caviar.service.store._leases import TELL_GRACE_S, db_now
from caviar.service.store._records import StudyRef, still_current
from caviar.storage import StudyRecord, TrialLease


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


def record_with_counts(
    db: Database, record: StudyRecord | StudyRef
) -> tuple[StudyRecord, dict[TrialState, int]]:
    """The study's row as it is now and how many of its trials are in each state, in ONE statement.

    One statement is one snapshot (SQLite, and PostgreSQL under read committed alike): the state and
    the counts agree with each other, which is what settling a study needs.

    Raises:
        NotFound: ``study_not_found`` when the row is gone (or is another study's now).
    """
    counts = dict.fromkeys(TrialState, 0)
    current: StudyRecord | None = None
    with db.session() as session:
        rows = session.execute(
            select(StudyRecord, TrialModel.state, func.count(TrialModel.trial_id))
            .outerjoin(TrialModel, TrialModel.study_id == StudyRecord.optuna_study_id)
            .where(StudyRecord.id == record.id)
            .group_by(StudyRecord.id, TrialModel.state)
        )
        for row, state, count in rows:
            current = row
            if state is not None:
                counts[TrialState(state)] += int(count)
    return still_current(current, record), counts


def trial_total(db: Database, record: StudyRecord) -> int:
    """How many trials a study has (every state), counted by the database."""
    with db.session() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(TrialModel)
                .where(TrialModel.study_id == record.optuna_study_id)
            )
            or 0
        )


def trials_by_state(session: Session) -> dict[str, int]:
    """How many trials all studies have in each state, by Optuna's lower-case state name."""
    rows = session.execute(select(TrialModel.state, func.count()).group_by(TrialModel.state)).all()
    return {state.name.lower(): int(count) for state, count in rows}


def study_of_trial(session: Session, trial_id: int) -> int | None:
    """The Optuna study id of a trial id (Optuna's storage API has no such lookup), or None."""
    return session.scalar(select(TrialModel.study_id).where(TrialModel.trial_id == trial_id))


def unleased_running(db: Database, study_states: Sequence[str]) -> dict[int, list[int]]:
    """Running trials without a live lease, by study, of the studies in ``study_states``: no lease
    at all, or one a tell ended over ``TELL_GRACE_S`` ago (see
    :func:`~caviar.service.store.died_while_told`).

    One indexed read of Optuna's trial table beside caviar's lease table (no trial is loaded): the
    reaper's search for the leftovers of a crashed ask or tell costs the same with 1,000 trials
    running as with none. Whether a candidate was asked through caviar (and is still running) is
    for the caller to check through Optuna's storage.

    Returns:
        Optuna trial ids by caviar study id, in trial id order.
    """
    with db.session() as session:
        rows = session.execute(
            select(StudyRecord.id, TrialModel.trial_id)
            .join(TrialModel, TrialModel.study_id == StudyRecord.optuna_study_id)
            .outerjoin(TrialLease, TrialLease.trial_id == TrialModel.trial_id)
            .where(
                StudyRecord.state.in_(list(study_states)),
                TrialModel.state == TrialState.RUNNING,
                or_(
                    TrialLease.trial_id.is_(None),
                    and_(
                        TrialLease.status == "finished",
                        TrialLease.expires_at < db_now(db.engine.dialect.name, -TELL_GRACE_S),
                    ),
                ),
            )
            .order_by(TrialModel.trial_id)
        ).all()
    found: dict[int, list[int]] = {}
    for study_id, trial_id in rows:
        found.setdefault(study_id, []).append(trial_id)
    return found


def trials_by_id(db: Database, optuna_study_id: int, trial_ids: Collection[int]) -> dict[int, FrozenTrial]:
    """Several trials of a study as Optuna has them, in one read.

    Optuna's ``get_trial`` reads a running trial with six statements; its RDB storage loads any set of
    trials with one query per table (``_get_trials``, what its trial cache uses). Without that loader
    (another Optuna storage) each trial is read with ``get_trial``.
    """
    storage = db.optuna
    load = getattr(getattr(storage, "_backend", storage), "_get_trials", None)
    found: dict[int, FrozenTrial] = {}
    if load is not None and trial_ids:
        # the loader takes the given ids, plus those above a bound: the largest id (an INTEGER) takes none
        found = {t._trial_id: t for t in load(optuna_study_id, None, set(trial_ids), 2**31 - 1)}
    return {tid: found[tid] if tid in found else storage.get_trial(tid) for tid in trial_ids}


def set_user_attrs(db: Database, trial_id: int, attrs: Mapping[str, Any]) -> None:
    """A running trial's user attributes, all in one transaction: each written by Optuna's own code
    (``RDBStorage._set_trial_attr_without_commit``, what ``set_trial_user_attr`` runs with a
    transaction of its own per attribute; a trainer's tell carries seven).

    Raises:
        UpdateFinishedTrialError: the trial has finished; nothing is written.
    """
    backend = _rdb(db)
    with _create_scoped_session(backend.scoped_session, True) as session:
        for key, value in attrs.items():
            backend._set_trial_attr_without_commit(session, TrialUserAttributeModel, trial_id, key, value)


def set_intermediate_values(db: Database, values: Sequence[tuple[int, int, float]]) -> set[int]:
    """``(trial id, step, value)`` of several running trials in one transaction (a fused group's
    epoch), each written by Optuna's own code (``RDBStorage._set_trial_intermediate_value_without_
    commit``, what ``set_trial_intermediate_value`` runs in a transaction of its own per value).

    Returns:
        The trials that had finished: their values are not written, the others' are.
    """
    backend = _rdb(db)
    finished: set[int] = set()
    if not values:
        return finished
    with _create_scoped_session(backend.scoped_session, True) as session:
        for trial_id, step, value in values:
            try:  # Optuna checks the trial's state before it writes anything
                backend._set_trial_intermediate_value_without_commit(session, trial_id, step, value)
            except UpdateFinishedTrialError:
                finished.add(trial_id)
    return finished


def _rdb(db: Database) -> RDBStorage:
    """Optuna's RDB storage behind its trial cache (what writes of running trials go to)."""
    backend = getattr(db.optuna, "_backend", db.optuna)
    assert isinstance(backend, RDBStorage)
    return backend
