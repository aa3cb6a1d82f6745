"""The trial lifecycle: ask and tell (reports: :mod:`caviar.service.trials.reports`).

Plain functions over a :class:`~caviar.service.db.Database`, called by the REST API (and so by
every worker and client). Budget-sensitive steps (ask, a failing tell) run under
:meth:`Database.study_lock`, which makes the global trial budget exact across threads,
processes and machines.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select, update

from caviar.service.db import Database
from caviar.service.definition import (
    StudyDefinition,
    check_params,
    decode,
    decode_params,
    is_active,
    is_reversed,
    sampling_order,
    stored_name,
)
from caviar.service.errors import Conflict, NotFound, RateLimited
from caviar.service.store import (
    ACTIVE_STATES,
    ASKED,
    ATTEMPT,
    FAIL_REASON,
    READY,
    RETRY_OF,
    STOPPED_STATES,
    WORKER,
    LeasePolicy,
    StudyRef,
    all_trials,
    close_lease,
    definition_of,
    end_reason,
    end_study,
    end_told,
    forget,
    lease_of,
    load_record,
    record_with_counts,
    remember,
    sampling,
    settle_study,
    started_trial,
    study_handle,
    study_ref,
    transition,
    trial_id,
    trial_number,
    used_count,
)
from caviar.service.trials.leases import ANYONE, Caller, check_owner, study_stopped
from caviar.service.trials.outcomes import final_state, record_attrs, requeue_retry, told_before
from caviar.service.trials.reads import to_read
from caviar.service.trials.schemas import TrialAssignment, TrialRead
from caviar.storage import StudyRecord, TrialLease, utcnow

# ---- ask -----------------------------------------------------------------------------------


def ask(
    db: Database,
    name: str,
    *,
    worker_id: str | None = None,
    request_id: str | None = None,
    policy: LeasePolicy,
    fixed: Mapping[str, Any] | None = None,
) -> TrialAssignment:
    """Claim a trial: a waiting one first (retries, enqueued trials), else a newly sampled one.

    Args:
        db: the database.
        name: study name.
        worker_id: who runs the trial (one worker may hold many trials).
        request_id: makes the ask idempotent: the same id returns the same trial.
        policy: lease timing.
        fixed: decoded parameter values to hold fixed while the sampler chooses the rest (fused
            groups pin their non-fusible hyperparameters this way).

    Raises:
        Conflict: ``study_paused``, ``study_stopped``, ``study_failed`` or ``budget_exhausted``, in
            that precedence.
        RateLimited: ``max_parallel_reached`` when the study runs ``max_parallel`` trials.
        InvalidInput: a ``fixed`` value that does not fit the search space (see
            :func:`~caviar.service.definition.check_params`).
    """
    try:
        return _ask(db, study_ref(db, name), worker_id, request_id, policy, fixed)
    except _StaleRef:  # the remembered id is another study's now (deleted and created again)
        forget(db, name)
        return _ask(db, study_ref(db, name), worker_id, request_id, policy, fixed)


class _StaleRef(Exception):
    """The study row read by a remembered id is gone or is another study's now."""


def _ask(
    db: Database,
    ref: StudyRef,
    worker_id: str | None,
    request_id: str | None,
    policy: LeasePolicy,
    fixed: Mapping[str, Any] | None,
) -> TrialAssignment:
    """:func:`ask` for a study known by its remembered identity: the row is read once, under the lock."""
    if request_id is not None:
        earlier = _lease_by_request(db, ref, request_id)
        if earlier is not None:
            return _replay(db, load_record(db, ref.name), earlier, policy)
    # Under the lock only what the budget depends on: the checks, the running trial and its
    # lease. Sampling (the expensive part) runs after it, concurrently with other asks; the
    # sampler's constant liar sees the other running trials.
    with db.study_lock(ref.id):
        try:
            record, counts = record_with_counts(db, ref)  # the ask's one read of the row (and counts)
        except NotFound:
            raise _StaleRef from None
        remember(db, record)
        definition = definition_of(record)
        encoded_fixed = (
            check_params(definition.search_space, fixed, partial=True, where="fixed").stored
            if fixed
            else None
        )
        replayed = _lease_by_request(db, ref, request_id) if request_id is not None else None
        if replayed is None:
            record, definition, started, lease = _claim(db, record, counts, worker_id, request_id, policy)
    if replayed is not None:  # the same request retried concurrently: one trial for both
        return _replay(db, record, replayed, policy)
    study = study_handle(db, record, definition, trial_number=started.number)
    if encoded_fixed and not started.waiting:
        study.sampler = optuna.samplers.PartialFixedSampler(encoded_fixed, study.sampler)
    if started.created is not None:
        trial = started_trial(study, started.created)  # no read of the trial just created
    else:
        trial = optuna.Trial(study, started.trial_id)
    with sampling(db, lease, policy):  # holds the lease while sampling; it starts once sampled
        _sample(trial, definition)
    decoded = decode_params(definition.search_space, dict(trial.params))
    for key, param in definition.search_space.items():
        if is_reversed(param) and key in decoded and started.user_attrs.get(key) != decoded[key]:
            db.optuna.set_trial_user_attr(started.trial_id, key, decoded[key])
    if request_id is not None:  # a replay of this request may now answer with the whole assignment
        db.optuna.set_trial_system_attr(started.trial_id, READY, True)
    return _assignment(record.name, decoded, lease, policy)


def _claim(
    db: Database,
    record: StudyRecord,
    counts: dict[TrialState, int],
    worker_id: str | None,
    request_id: str | None,
    policy: LeasePolicy,
) -> tuple[StudyRecord, StudyDefinition, _Started, TrialLease]:
    """Under the study lock: check the study and the budget, start a trial, write its lease.

    ``record`` and its trial ``counts`` were read under the lock (one aggregate: the history is never
    loaded here): an edit of the budget (PATCH) or a stop takes the same lock, so no ask overshoots a
    budget that was just lowered.
    """
    name = record.name
    definition = definition_of(record)
    if record.state in ACTIVE_STATES:
        reason = end_reason(db, definition, record)
        if reason is not None and end_study(db, record, reason):
            record, counts = record_with_counts(db, record)
    if record.state == "paused":
        raise Conflict(f"study {name!r} is paused", code="study_paused")
    if record.state in STOPPED_STATES:
        raise study_stopped(record)
    if record.state == "failed":
        raise Conflict(f"study {name!r} failed: too many failed trials", code="study_failed")
    if counts[TrialState.WAITING] == 0 and (
        record.state == "completed" or used_count(counts) >= definition.budget.n_trials
    ):
        raise Conflict(
            f"study {name!r} has used its budget of {definition.budget.n_trials} trials",
            code="budget_exhausted",
        )
    max_parallel = definition.budget.max_parallel
    if max_parallel is not None and counts[TrialState.RUNNING] >= max_parallel:
        raise RateLimited(
            f"study {name!r} already runs {max_parallel} trials (max_parallel)",
            code="max_parallel_reached",
            retry_after_s=max(1, math.ceil(policy.heartbeat_interval_s / 2)),
        )
    waiting = all_trials(db, record, [TrialState.WAITING]) if counts[TrialState.WAITING] else []
    started = _start_trial(db, record, waiting, worker_id)
    now = utcnow()
    timeout = definition.budget.trial_timeout_s
    lease = TrialLease(
        trial_id=started.trial_id,
        study_id=record.id,
        number=started.number,
        worker_id=worker_id,
        request_id=request_id,
        status="active",
        attempt=int(started.user_attrs.get(ATTEMPT, 0)),
        retry_of=started.user_attrs.get(RETRY_OF),
        started_at=now,
        expires_at=policy.expiry(now),
        deadline_at=now + timedelta(seconds=timeout) if timeout else None,
    )
    with db.session() as session, session.begin():
        session.add(lease)
    if record.state == "queued":
        transition(db, record, ["queued"], "running", started_at=record.started_at or now)
    elif record.started_at is None:  # a study that started before started_at was recorded
        with db.session() as session, session.begin():
            session.execute(
                update(StudyRecord)
                .where(StudyRecord.id == record.id, StudyRecord.started_at.is_(None))
                .values(started_at=now)
            )
    return record, definition, started, lease


@dataclass(frozen=True)
class _Started:
    trial_id: int
    number: int
    waiting: bool
    user_attrs: dict[str, Any]
    created: FrozenTrial | None = None  # a new trial as stored (its template, numbered)


def _start_trial(
    db: Database, record: StudyRecord, waiting: Sequence[FrozenTrial], worker_id: str | None
) -> _Started:
    """Move the first waiting trial to running, or create a running trial.

    Either way the trial is marked as asked through caviar *before* it runs, so a crash between
    this and the lease row (a database restart, say) leaves a trial the reaper recognises and
    recovers instead of one that runs forever.
    """
    attrs: dict[str, Any] = {ASKED: True}
    if worker_id is not None:
        attrs[WORKER] = worker_id
    for trial in sorted((t for t in waiting if t.state == TrialState.WAITING), key=lambda t: t.number):
        for key, value in attrs.items():
            db.optuna.set_trial_user_attr(trial._trial_id, key, value)
        if db.optuna.set_trial_state_values(trial._trial_id, TrialState.RUNNING):
            return _Started(trial._trial_id, trial.number, True, dict(trial.user_attrs))
    template = FrozenTrial(
        number=-1,
        state=TrialState.RUNNING,
        value=None,
        datetime_start=datetime.now(),  # Optuna stores naive local times
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs=attrs,
        system_attrs={},
        intermediate_values={},
        trial_id=-1,
    )
    new_id = db.optuna.create_new_trial(record.optuna_study_id, template_trial=template)
    template.number, template._trial_id = trial_number(db, new_id), new_id
    return _Started(new_id, template.number, False, attrs, template)


def _sample(trial: optuna.Trial, definition: StudyDefinition) -> None:
    """Suggest every active parameter (parents before their conditional children)."""
    decoded: dict[str, Any] = {}
    space = definition.search_space
    for name in sampling_order(space):
        param = space[name]
        if not is_active(param, decoded):
            continue
        decoded[name] = decode(param, trial._suggest(stored_name(name, param), param.distribution()))


def _assignment(name: str, params: dict[str, Any], lease: TrialLease, policy: LeasePolicy) -> TrialAssignment:
    """What an ask answers: the trial's decoded parameters and its lease."""
    return TrialAssignment(
        study=name,
        number=lease.number,
        params=params,
        heartbeat_interval_s=policy.heartbeat_interval_s,
        lease_expires_at=lease.expires_at,
        retry_of=lease.retry_of,
    )


REPLAY_WAIT_S = 5.0
"""How long a repeated ask waits for the first one to finish sampling before answering 409."""


def _lease_by_request(db: Database, record: StudyRecord | StudyRef, request_id: str) -> TrialLease | None:
    with db.session() as session:
        return session.scalar(
            select(TrialLease).where(TrialLease.study_id == record.id, TrialLease.request_id == request_id)
        )


def _replay(db: Database, record: StudyRecord, lease: TrialLease, policy: LeasePolicy) -> TrialAssignment:
    """The assignment an earlier ask with the same request id made, once its sampling finished.

    Raises:
        Conflict: ``ask_in_progress`` (with Retry-After) when the first ask is still sampling.
    """
    deadline = time.monotonic() + REPLAY_WAIT_S
    while True:
        trial = db.optuna.get_trial(lease.trial_id)
        if trial.system_attrs.get(READY) or trial.state != TrialState.RUNNING:
            # One read of a trial is several statements, each with its own snapshot: the
            # parameters may have been read before the last of them and READY after it. Every
            # parameter was committed before READY, so a read that starts now sees them all.
            trial = db.optuna.get_trial(lease.trial_id)
            break
        if time.monotonic() > deadline:
            raise Conflict(
                f"the ask {lease.request_id!r} of {record.name!r} is still being answered; repeat it shortly",
                code="ask_in_progress",
                retry_after_s=1,
            )
        time.sleep(0.05)
    return _assignment(
        record.name, decode_params(definition_of(record).search_space, trial.params), lease, policy
    )


# ---- tell ----------------------------------------------------------------------------------


def tell(
    db: Database,
    name: str,
    number: int,
    state: str,
    *,
    values: Sequence[float] | None = None,
    reason: str | None = None,
    user_attrs: Mapping[str, Any] | None = None,
    caller: Caller = ANYONE,
    fatal: bool = False,
) -> TrialRead:
    """Finish a trial as ``complete`` (with values), ``pruned`` or ``fail``.

    A ``fatal`` failure is the study's rather than the trial's (a worker could not read the program's
    output at all): the trial is not retried and the study is paused with the reason as its
    ``stop_reason``, so the rest of the budget is not spent on programs that would fail the same way.

    Repeating a tell with the same final state and values returns the trial; anything else on a
    finished trial is ``trial_finished``, and on a reaped trial ``lease_lost``. A failed trial is
    re-queued with the same parameters while it has retries left. ``user_attrs`` (epochs,
    timings, final metrics, ...) are recorded on the trial before it finishes.
    """
    record = load_record(db, name)
    definition = definition_of(record)
    final = final_state(definition, state, values)
    tid = trial_id(db, record, number)
    if not caller.any_trial:
        check_owner(record, number, lease_of(db, tid), caller)
    if user_attrs:
        record_attrs(db, record, tid, user_attrs)
    if final != TrialState.FAIL:
        # No study lock: the lease row decides a race with the reaper (claim_end), Optuna's state
        # check a repeated tell, and each tell settles the study after its own commit.
        return _finish(db, record, definition, tid, number, final, values)
    # A failure re-queues a retry, which must not race an ask's budget count.
    with db.study_lock(record.id):
        trial = db.optuna.get_trial(tid)
        lease = lease_of(db, tid)
        if trial.state.is_finished():
            return told_before(definition, record, trial, lease, final, values)
        if trial.state != TrialState.RUNNING:
            raise Conflict(f"trial {number} of {name!r} is not running", code="trial_not_running")
        if reason:
            db.optuna.set_trial_user_attr(tid, FAIL_REASON, reason[:2000])
        finished = study_handle(db, record, definition).tell(number, state=final)
        close_lease(db, tid, reason)
        if fatal:
            why = f"paused: {reason or 'fatal failure'}"[:2000]
            transition(db, record, ["queued", "running"], "paused", stop_reason=why)
        else:
            requeue_retry(db, record, definition, finished, lease)
        settle_study(db, record)
    if lease is not None:
        lease.status = "finished"
    return to_read(definition, finished, lease)


def _finish(
    db: Database,
    record: StudyRecord,
    definition: StudyDefinition,
    tid: int,
    number: int,
    final: TrialState,
    values: Sequence[float] | None,
) -> TrialRead:
    """Complete or prune a trial: the lease closed (which decides a race with the reaper or a
    hand-back: :func:`~caviar.service.store.claim_end`), Optuna's tell, the study settled."""
    lost = end_told(db, tid)
    if lost is not None:
        return told_before(definition, record, db.optuna.get_trial(tid), lost, final, values)
    try:
        finished = study_handle(db, record, definition).tell(
            number, values=list(values) if values is not None else None, state=final
        )
    except (UpdateFinishedTrialError, ValueError):
        trial = db.optuna.get_trial(tid)
        if trial.state.is_finished():
            return told_before(definition, record, trial, lease_of(db, tid), final, values)
        if trial.state != TrialState.RUNNING:
            raise Conflict(
                f"trial {number} of {record.name!r} is not running", code="trial_not_running"
            ) from None
        raise
    settle_study(db, record)
    return to_read(definition, finished)
