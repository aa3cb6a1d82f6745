"""Leases: an ask starts one, heartbeats and reports renew it, the reaper fails and retries
trials whose lease lapsed (or that ran past ``trial_timeout_s``), a stopping worker hands its
trials back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from sqlalchemy import ColumnElement, select

from caviar.service.db import Database
from caviar.service.definition import StudyDefinition
from caviar.service.errors import Conflict
from caviar.service.store import (
    ASKED,
    FAIL_REASON,
    RELEASED,
    STOPPED_STATES,
    LeasePolicy,
    all_trials,
    check_running,
    claim_end,
    db_now,
    deadline_passed,
    definition_of,
    died_while_told,
    end_lease,
    end_study,
    frozen,
    lease_of,
    lease_rows,
    leases_for,
    load_record,
    renew,
    sampling_holds,
    settle_study,
    unleased_running,
)
from caviar.service.trials.outcomes import requeue_retry
from caviar.storage import StudyRecord, TrialLease


@dataclass(frozen=True)
class Caller:
    """Who acts on a trial.

    Attributes:
        worker_id: the worker id the caller gave: a label for logs, never proof of anything.
        any_trial: may act on this trial: write scope, a service without tokens, the trial's own
            credential, or a worker that proved it claimed the trial (see
            :func:`caviar.service.deps.may_act_on_trial`).
        proves: otherwise, whether the credential the caller sent with this trial names its lease
            (a batch of reports carries one per trial; see :func:`caviar.service.trials.report_many`).
    """

    worker_id: str | None = None
    any_trial: bool = True
    proves: Callable[[TrialLease], bool] | None = None


ANYONE = Caller()


def check_owner(record: StudyRecord, number: int, lease: TrialLease | None, caller: Caller) -> None:
    """Refuse a heartbeat, report, suggest, upload, tell or hand-back from a caller that has not
    proved it claimed the trial (and has no write scope).

    Raises:
        Conflict: ``not_your_trial``.
    """
    if caller.any_trial or (caller.proves is not None and lease is not None and caller.proves(lease)):
        return
    raise Conflict(
        f"trial {number} of {record.name!r} is not yours: send the credential its ask answered "
        "(header X-Caviar-Lease), or use a token with write scope",
        code="not_your_trial",
    )


def heartbeat(db: Database, name: str, number: int, *, policy: LeasePolicy, caller: Caller = ANYONE) -> None:
    """Keep a trial's lease.

    An active lease is renewed on the lease path (one read and one UPDATE on the database's lease
    pool: no study lock, no Optuna storage); anything else (an ended lease, a trial created outside
    caviar, a caller that must prove its claim) takes the full path that names the error.

    Raises:
        Conflict: ``lease_lost``, ``trial_finished`` or ``trial_not_running`` (see
            :func:`check_running`); ``not_your_trial`` when the caller holds neither the lease nor
            the write scope; ``study_stopped`` when the study is stopping: the lease is still
            renewed, so the trial can end at its next report (``should_prune``) or tell its result.
    """
    row = lease_rows(db, [(name, number)]).get((name, number)) if caller.any_trial else None
    if row is not None and row.error is None and renew(db, row.trial_id, policy):
        if row.study_state in STOPPED_STATES:
            raise study_stopped(load_record(db, name))
        return
    record = load_record(db, name)
    trial = frozen(db, record, number)
    if not caller.any_trial:
        check_owner(record, number, lease_of(db, trial._trial_id), caller)
    if not renew(db, trial._trial_id, policy):
        check_running(db, record, trial)
    if record.state in STOPPED_STATES:
        raise study_stopped(record)


def study_stopped(record: StudyRecord) -> Conflict:
    """The refusal of a stopping or stopped study (asks, heartbeats)."""
    why = f" ({record.stop_reason})" if record.stop_reason else ""
    return Conflict(f"study {record.name!r} is {record.state}{why}", code="study_stopped")


# ---- reaping -------------------------------------------------------------------------------


def reap(db: Database, *, now: datetime | None = None, margin_s: float = 0.0) -> int:
    """Fail every trial whose lease lapsed or that ran past ``trial_timeout_s``; re-queue retries.

    A lease is judged by the DATABASE's clock (the clock its renewals were stamped with), with
    ``margin_s`` seconds of grace past its expiry; ``now`` (tests) judges by that time instead,
    without grace. A trial this process is still sampling is never reaped (its sampling holds its
    lease: :class:`~caviar.service.store.SamplingHolds`). Safe to call from every server process
    at once.

    Returns:
        The number of trials reaped.
    """
    lapsed, timed_out = _due(db, now, margin_s)
    with db.session() as session:
        due = list(
            session.scalars(select(TrialLease).where(TrialLease.status == "active", lapsed | timed_out))
        )
    held = sampling_holds(db).held()
    due = [lease for lease in due if lease.trial_id not in held]
    reaped = _reap_orphans(db)
    for study_id in sorted({lease.study_id for lease in due}):
        with db.session() as session:
            record = session.get(StudyRecord, study_id)
        if record is None:
            continue
        definition = definition_of(record)
        with db.study_lock(study_id):
            for lease in (item for item in due if item.study_id == study_id):
                reaped += _reap_one(db, record, definition, lease.trial_id, now, margin_s)
            settle_study(db, record)
    end_overdue(db, now=now)
    return reaped


def _due(
    db: Database, now: datetime | None, margin_s: float
) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """SQL conditions: a lease lapsed (past expiry plus the margin), a trial ran past its deadline."""
    if now is not None:
        return TrialLease.expires_at < now, TrialLease.deadline_at < now
    dialect = db.engine.dialect.name
    return TrialLease.expires_at < db_now(dialect, -margin_s), TrialLease.deadline_at < db_now(dialect)


def end_overdue(db: Database, *, now: datetime | None = None) -> list[str]:
    """End every started study whose ``budget.max_duration_s`` has passed (the reaper calls this).

    Returns:
        The names of the studies it ended.
    """
    with db.session() as session:
        records = list(
            session.scalars(
                select(StudyRecord).where(
                    StudyRecord.state.in_(("running", "paused")), StudyRecord.started_at.is_not(None)
                )
            )
        )
    ended = []
    for record in records:
        reason = deadline_passed(definition_of(record), record, now)
        if reason is not None and end_study(db, record, reason):
            ended.append(record.name)
    return ended


def _reap_orphans(db: Database) -> int:
    """Recover trials asked through caviar that a crash left running: an ask that died before
    writing the lease row, or a tell that died after closing the lease (:func:`claim_end`) and
    before writing the trial's end (:data:`~caviar.service.store.TELL_GRACE_S` ago or more).

    An ask writes the lease before it releases the study lock, so under that lock a running trial
    marked as asked but without a lease can only be the leftover of an ask that died half-way.
    One read finds the candidates (:func:`~caviar.service.store.unleased_running`); a study's
    running trials are loaded only when it has one, not every few seconds for every study.
    """
    candidates = unleased_running(db, ("running", "paused", "stopping"))
    if not candidates:
        return 0
    with db.session() as session:
        records = list(session.scalars(select(StudyRecord).where(StudyRecord.id.in_(list(candidates)))))
    reaped = 0
    for record in records:
        wanted = set(candidates[record.id])
        running = all_trials(db, record, [TrialState.RUNNING])
        stale = [t for t in running if t._trial_id in wanted and t.user_attrs.get(ASKED)]
        if not stale:
            continue
        ids = [t._trial_id for t in stale]
        leased = leases_for(db, ids)
        untold = died_while_told(db, ids)
        orphans = [t for t in stale if t._trial_id not in leased or t._trial_id in untold]
        if not orphans:
            continue
        definition = definition_of(record)
        with db.study_lock(record.id):
            for trial in orphans:
                told = trial._trial_id in untold
                if not told and lease_of(db, trial._trial_id) is not None:
                    continue
                current = db.optuna.get_trial(trial._trial_id)
                if current.state != TrialState.RUNNING:
                    continue
                why = "lost while being told" if told else "lost while being handed out"
                db.optuna.set_trial_user_attr(trial._trial_id, FAIL_REASON, why)
                db.optuna.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                if told:
                    end_lease(db, trial._trial_id, "reaped", why)
                lease = leased.get(trial._trial_id)
                requeue_retry(db, record, definition, db.optuna.get_trial(trial._trial_id), lease)
                reaped += 1
            settle_study(db, record)
    return reaped


def _reap_one(
    db: Database,
    record: StudyRecord,
    definition: StudyDefinition,
    trial_id: int,
    now: datetime | None,
    margin_s: float = 0.0,
) -> int:
    lapsed, deadline = _due(db, now, margin_s)
    with db.session() as session:  # read again under the lock: renewed or told meanwhile?
        row = session.execute(
            select(TrialLease, deadline.label("timed_out")).where(
                TrialLease.trial_id == trial_id, TrialLease.status == "active", lapsed | deadline
            )
        ).first()
    if row is None or trial_id in sampling_holds(db).held():
        return 0
    lease, timed_out = row[0], bool(row[1])
    reason = "trial timeout" if timed_out else "lease expired (no heartbeat)"
    if not claim_end(db, trial_id, "reaped", reason, due=lapsed | deadline):
        return 0  # a tell (or a renewal) came first: the lease row decides, see claim_end
    try:
        trial = db.optuna.get_trial(trial_id)
    except KeyError:
        trial = None
    failed = False
    if trial is not None and not trial.state.is_finished():
        with contextlib.suppress(UpdateFinishedTrialError):  # finished outside caviar meanwhile
            db.optuna.set_trial_user_attr(trial_id, FAIL_REASON, reason)
            db.optuna.set_trial_state_values(trial_id, TrialState.FAIL)
            failed = True
    if not failed or trial is None:
        end_lease(db, trial_id, "finished", reason)
        return 0
    requeue_retry(db, record, definition, db.optuna.get_trial(trial_id), lease)
    return 1


# ---- handing back --------------------------------------------------------------------------


def release(
    db: Database, name: str, number: int, *, reason: str = "handed back by worker", caller: Caller = ANYONE
) -> None:
    """Hand a running trial back: it is failed and re-queued without using up a retry."""
    record = load_record(db, name)
    definition = definition_of(record)
    trial = frozen(db, record, number)
    with db.study_lock(record.id):
        trial = db.optuna.get_trial(trial._trial_id)
        lease = lease_of(db, trial._trial_id)
        check_owner(record, number, lease, caller)
        if trial.state != TrialState.RUNNING:
            return
        db.optuna.set_trial_user_attr(trial._trial_id, FAIL_REASON, reason)
        db.optuna.set_trial_user_attr(trial._trial_id, RELEASED, True)
        db.optuna.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        end_lease(db, trial._trial_id, "released", reason)
        requeue_retry(db, record, definition, db.optuna.get_trial(trial._trial_id), lease, handed_back=True)
        settle_study(db, record)
