"""Steering a study that exists: edit its budget, priority and tags; resume it; stop it.

Every change that the budget depends on runs under :meth:`Database.study_lock`, the lock under
which an ask counts the budget, so a budget lowered while workers ask is never overshot.
"""

from __future__ import annotations

from datetime import timedelta

from optuna.trial import TrialState
from sqlalchemy import select, update

from caviar.service.db import Database
from caviar.service.errors import Conflict
from caviar.service.store import (
    STOPPED_STATES,
    all_trials,
    budget_spent,
    end_study,
    fail_count,
    load_record,
    parse_definition,
    reload,
    settle_study,
    state_counts,
    transition,
    used_count,
)
from caviar.service.studies.schemas import StudyUpdate
from caviar.storage import StudyRecord, TrialLease, utcnow


def update_study(db: Database, name: str, change: StudyUpdate) -> StudyRecord:
    """Apply a change to a study's budget, priority or tags (a JSON merge patch).

    ``budget.n_trials`` may go up or down but never below the trials already used (complete,
    pruned, running and waiting). Raising it reopens a completed study; raising
    ``max_failed_trials`` above the failed count resumes a failed one. Lowering either may end the
    study at once (completed or failed), as may a goal already reached or a deadline already past.
    A new ``trial_timeout_s`` applies to running trials too (from their start).

    Raises:
        NotFound: no such study.
        Conflict: ``budget_below_used``; ``study_stopped`` for a budget change of a stopping or
            stopped study (its priority and tags may still change).
        InvalidInput: the changed definition is invalid (the message names the field).
    """
    record = load_record(db, name)
    with db.study_lock(record.id):
        record = reload(db, record)
        data = dict(record.definition)
        budget_fields = change.budget.model_dump(exclude_unset=True) if change.budget is not None else {}
        if budget_fields and record.state in STOPPED_STATES:
            raise Conflict(
                f"study {name!r} is {record.state}: its budget no longer changes "
                "(start a new study, e.g. with warm_start from this one)",
                code="study_stopped",
            )
        data["budget"] = {**data.get("budget", {}), **budget_fields}
        if change.priority is not None:
            data["priority"] = change.priority
        if change.tags is not None:
            tags = dict(data.get("tags", {}))
            for key, value in change.tags.items():
                if value is None:
                    tags.pop(key, None)
                else:
                    tags[key] = value
            data["tags"] = tags
        definition = parse_definition(data)
        trials = all_trials(db, record)
        counts = state_counts(trials)
        used = used_count(counts)
        if definition.budget.n_trials < used:
            raise Conflict(
                f"budget.n_trials: {used} trials are already used (complete {counts[TrialState.COMPLETE]}, "
                f"pruned {counts[TrialState.PRUNED]}, running {counts[TrialState.RUNNING]}, waiting "
                f"{counts[TrialState.WAITING]}); n_trials cannot be lower",
                code="budget_below_used",
            )
        with db.session() as session, session.begin():
            session.execute(
                update(StudyRecord)
                .where(StudyRecord.id == record.id)
                .values(
                    definition=definition.model_dump(mode="json"),
                    definition_version=StudyRecord.definition_version + 1,
                    priority=definition.priority,
                    updated_at=utcnow(),
                )
            )
        if definition.sampler.type == "auto":  # the plan follows the budget (n_trials, max_parallel)
            db.optuna.set_study_user_attr(
                record.optuna_study_id, "caviar:sampler", definition.sampler_description()
            )
        reopened = record.state == "completed" and not budget_spent(counts, definition.budget.n_trials)
        resumed = record.state == "failed" and fail_count(trials) <= definition.budget.max_failed_trials
        if reopened or resumed:
            transition(db, record, [record.state], "running" if record.started_at is not None else "queued")
        if "trial_timeout_s" in budget_fields:
            _retime_leases(db, record, definition.budget.trial_timeout_s)
        settle_study(db, record)
        return reload(db, record)


def _retime_leases(db: Database, record: StudyRecord, timeout_s: float | None) -> None:
    """Give the running trials of a study the new ``trial_timeout_s`` (counted from their start)."""
    with db.session() as session, session.begin():
        leases = session.scalars(
            select(TrialLease).where(TrialLease.study_id == record.id, TrialLease.status == "active")
        )
        for lease in leases:
            lease.deadline_at = lease.started_at + timedelta(seconds=timeout_s) if timeout_s else None


def resume_study(db: Database, name: str) -> StudyRecord:
    """Hand out trials again after a pause (and settle: a budget lowered meanwhile may be done).

    Clears ``stop_reason``: the reason of a pause a worker made (``paused: setup error: ...``)
    is gone once the study runs again.

    Raises:
        Conflict: ``invalid_state`` unless the study is paused.
    """
    record = load_record(db, name)
    with db.study_lock(record.id):
        record = reload(db, record)
        state = "running" if record.started_at is not None else "queued"
        if not transition(db, record, ["paused"], state, stop_reason=None):
            raise Conflict(f"study {name!r} is {record.state}, not paused", code="invalid_state")
        settle_study(db, record)
        return reload(db, record)


def stop_study(db: Database, name: str, *, reason: str | None = None) -> StudyRecord:
    """Stop a study: no new trials, waiting ones cancelled, running ones told to stop.

    The study is ``stopping`` until its running trials have ended (at their next report, which
    answers ``should_prune: true``; a worker's heartbeat lists them with ``study_stopped``), then
    ``stopped``.

    Stopping a study that is stopping already changes nothing and answers it.

    Raises:
        Conflict: ``invalid_state`` when the study is completed, failed or stopped.
    """
    record = load_record(db, name)
    if not end_study(db, record, _reason(reason)):
        current = reload(db, record)
        raise Conflict(f"study {name!r} is {current.state} and cannot be stopped", code="invalid_state")
    return reload(db, record)


def _reason(reason: str | None) -> str:
    return f"stopped by request: {reason}" if reason else "stopped by request"
