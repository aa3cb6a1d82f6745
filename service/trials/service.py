"""The trial lifecycle: ask, report, heartbeat, tell, reap; reads, importances, refine.

Plain functions over a :class:`~service.db.Database`. The REST API and the workers call the
same functions, so leases, budgets and retries behave the same for both.

Budget-sensitive steps (ask, tell, reap, release) run under :meth:`Database.study_lock`, which
makes the global trial budget exact across threads, processes and machines.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select, update

from service.db import Database
from service.definition import (
    FloatParam,
    StudyDefinition,
    check_finite,
    decode_params,
    is_active,
    sampling_order,
    stored_name,
)
from service.errors import Conflict, InvalidInput, NotFound, RateLimited
from service.studies.service import (
    all_trials,
    definition_of,
    get_record,
    load_record,
    pareto_front,
    ranked,
    set_state,
)
from service.trials.schemas import ParetoTrials, TrialAssignment, TrialList, TrialRead
from storage import StudyRecord, TrialLease, utcnow

RETRY_OF = "caviar:retry_of"
ATTEMPT = "caviar:attempt"
FAIL_REASON = "caviar:fail_reason"
RELEASED = "caviar:released"
WORKER = "caviar:worker_id"
ASKED = "caviar:asked"

_STATE_NAMES = {
    TrialState.WAITING: "waiting",
    TrialState.RUNNING: "running",
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "fail",
}
_FINISHED_BY_NAME = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "fail": TrialState.FAIL}


@dataclass(frozen=True)
class LeasePolicy:
    """Lease timing: a lease lasts two heartbeat intervals."""

    heartbeat_interval_s: float = 30.0

    @property
    def lease_s(self) -> float:
        return 2 * self.heartbeat_interval_s


# ---- helpers -------------------------------------------------------------------------------


_studies: dict[tuple[str, int], optuna.Study] = {}


def _study(
    db: Database, record: StudyRecord, definition: StudyDefinition, trial_number: int = 0
) -> optuna.Study:
    """The Optuna study with its sampler (seeded for ``trial_number``) and pruner.

    The study handle is loaded once per process and copied per call, so concurrent calls each
    have their own sampler without reading the study row again.
    """
    key = (db.url, record.optuna_study_id)
    base = _studies.get(key)
    if base is None:
        if len(_studies) > 1024:
            _studies.clear()
        base = _studies[key] = optuna.Study(study_name=record.name, storage=db.optuna)
    study = copy.copy(base)
    study.sampler = definition.sampler_for(trial_number)
    study.pruner = definition.build_pruner()
    return study


def _trial_id(db: Database, record: StudyRecord, number: int) -> int:
    try:
        return db.optuna.get_trial_id_from_study_id_trial_number(record.optuna_study_id, number)
    except KeyError:
        raise NotFound(f"study {record.name!r} has no trial {number}", code="trial_not_found") from None


def _frozen(db: Database, record: StudyRecord, number: int) -> FrozenTrial:
    return db.optuna.get_trial(_trial_id(db, record, number))


def _lease(db: Database, trial_id: int) -> TrialLease | None:
    with db.session() as session:
        return session.get(TrialLease, trial_id)


def _fail_count(trials: Sequence[FrozenTrial]) -> int:
    return sum(1 for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get(RELEASED))


def _counts(trials: Sequence[FrozenTrial]) -> dict[TrialState, int]:
    counts = dict.fromkeys(TrialState, 0)
    for trial in trials:
        counts[trial.state] += 1
    return counts


def _utc(moment: datetime | None) -> datetime | None:
    """Optuna stores naive local times; the API speaks UTC."""
    return moment.astimezone(UTC) if moment is not None else None


def to_read(definition: StudyDefinition, trial: FrozenTrial, lease: TrialLease | None = None) -> TrialRead:
    """A frozen Optuna trial as the API shows it."""
    values = list(trial.values) if trial.values is not None else None
    retry_of = lease.retry_of if lease is not None else trial.user_attrs.get(RETRY_OF)
    return TrialRead(
        number=trial.number,
        state=_STATE_NAMES.get(trial.state, "fail"),
        params=decode_params(
            definition.search_space, trial.params or trial.system_attrs.get("fixed_params", {})
        ),
        value=values[0] if values is not None and len(values) == 1 else None,
        values=values,
        intermediate_values=dict(trial.intermediate_values),
        user_attrs={k: v for k, v in trial.user_attrs.items() if not k.startswith("caviar:")},
        worker_id=lease.worker_id if lease is not None else trial.user_attrs.get(WORKER),
        started_at=_utc(trial.datetime_start),
        finished_at=_utc(trial.datetime_complete),
        retry_of=retry_of,
        fail_reason=trial.user_attrs.get(FAIL_REASON) if trial.state == TrialState.FAIL else None,
    )


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


def _sample(trial: optuna.Trial, definition: StudyDefinition) -> None:
    """Suggest every active parameter (parents before their conditional children)."""
    decoded: dict[str, Any] = {}
    space = definition.search_space
    for name in sampling_order(space):
        param = space[name]
        if not is_active(param, decoded):
            continue
        value = trial._suggest(stored_name(name, param), param.distribution())
        decoded[name] = (
            1.0 - value if isinstance(param, FloatParam) and param.scale == "reverse_log" else value
        )


# ---- ask -----------------------------------------------------------------------------------


def ask(
    db: Database,
    name: str,
    *,
    worker_id: str | None = None,
    request_id: str | None = None,
    policy: LeasePolicy | None = None,
    fixed: dict[str, Any] | None = None,
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
        Conflict: ``study_paused``, ``study_failed`` or ``budget_exhausted``, in that precedence.
        RateLimited: ``max_parallel_reached`` when the study runs ``max_parallel`` trials.
    """
    policy = policy or LeasePolicy()
    record = load_record(db, name)
    if request_id is not None:
        existing = _by_request(db, record, request_id, policy)
        if existing is not None:
            return existing
    definition = definition_of(record)
    # Under the lock only what the budget depends on: the checks, the running trial and its
    # lease. Sampling (the expensive part) runs after it, concurrently with other asks; the
    # sampler's constant liar sees the other running trials.
    with db.study_lock(record.id):
        if request_id is not None:  # the same request retried concurrently: one trial for both
            existing = _by_request(db, record, request_id, policy)
            if existing is not None:
                return existing
        # The record read just before the lock is fresh enough: a pause racing this ask by a
        # few milliseconds may let it through, the budget cannot.
        if record.state == "paused":
            raise Conflict(f"study {name!r} is paused", code="study_paused")
        if record.state == "failed":
            raise Conflict(f"study {name!r} failed: too many failed trials", code="study_failed")
        trials = all_trials(db, record)
        counts = _counts(trials)
        used = sum(
            counts[s]
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        )
        if counts[TrialState.WAITING] == 0 and (
            record.state == "completed" or used >= definition.budget.n_trials
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
        started = _start_trial(db, record, trials, worker_id)
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
            expires_at=now + timedelta(seconds=policy.lease_s),
            deadline_at=now + timedelta(seconds=timeout) if timeout else None,
        )
        with db.session() as session, session.begin():
            session.add(lease)
            if record.state == "queued":
                record = get_record(session, name)
                set_state(session, record, "running")
    study = _study(db, record, definition, trial_number=started.number)
    if fixed and not started.waiting:
        study.sampler = optuna.samplers.PartialFixedSampler(_encode_fixed(definition, fixed), study.sampler)
    trial = optuna.Trial(study, started.trial_id)
    _sample(trial, definition)
    params = dict(trial.params)
    decoded = decode_params(definition.search_space, params)
    for key, param in definition.search_space.items():
        if isinstance(param, FloatParam) and param.scale == "reverse_log" and key in decoded:
            db.optuna.set_trial_user_attr(started.trial_id, key, decoded[key])
    return _assignment(record.name, decoded, lease, policy)


@dataclass(frozen=True)
class _Started:
    trial_id: int
    number: int
    waiting: bool
    user_attrs: dict[str, Any]


def _start_trial(
    db: Database, record: StudyRecord, trials: Sequence[FrozenTrial], worker_id: str | None
) -> _Started:
    """Move the first waiting trial to running, or create a running trial.

    Either way the trial is marked as asked through caviar *before* it runs, so a crash between
    this and the lease row (a database restart, say) leaves a trial the reaper recognises and
    recovers instead of one that runs forever.
    """
    attrs: dict[str, Any] = {ASKED: True}
    if worker_id is not None:
        attrs[WORKER] = worker_id
    for waiting in sorted((t for t in trials if t.state == TrialState.WAITING), key=lambda t: t.number):
        for key, value in attrs.items():
            db.optuna.set_trial_user_attr(waiting._trial_id, key, value)
        if db.optuna.set_trial_state_values(waiting._trial_id, TrialState.RUNNING):
            return _Started(waiting._trial_id, waiting.number, True, dict(waiting.user_attrs))
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
    trial_id = db.optuna.create_new_trial(record.optuna_study_id, template_trial=template)
    return _Started(trial_id, db.optuna.get_trial_number_from_id(trial_id), False, attrs)


def _encode_fixed(definition: StudyDefinition, fixed: dict[str, Any]) -> dict[str, Any]:
    encoded: dict[str, Any] = {}
    for key, value in fixed.items():
        param = definition.search_space.get(key)
        if param is None:
            continue
        if isinstance(param, FloatParam) and param.scale == "reverse_log":
            encoded[stored_name(key, param)] = 1.0 - float(value)
        else:
            encoded[key] = value
    return encoded


def _by_request(
    db: Database, record: StudyRecord, request_id: str, policy: LeasePolicy
) -> TrialAssignment | None:
    with db.session() as session:
        lease = session.scalar(
            select(TrialLease).where(TrialLease.study_id == record.id, TrialLease.request_id == request_id)
        )
    if lease is None:
        return None
    trial = db.optuna.get_trial(lease.trial_id)
    return _assignment(
        record.name, decode_params(definition_of(record).search_space, trial.params), lease, policy
    )


# ---- report / heartbeat --------------------------------------------------------------------


def _check_running(db: Database, record: StudyRecord, trial: FrozenTrial) -> TrialLease | None:
    """The trial's active lease (None for a trial created outside caviar); raise if it cannot run."""
    lease = _lease(db, trial._trial_id)
    if lease is not None and lease.status in ("reaped", "released"):
        raise Conflict(
            f"trial {trial.number} of {record.name!r} lost its lease ({lease.reason or lease.status}); "
            "its retry runs instead",
            code="lease_lost",
        )
    if trial.state.is_finished():
        raise Conflict(f"trial {trial.number} of {record.name!r} is already finished", code="trial_finished")
    if trial.state != TrialState.RUNNING:
        raise Conflict(f"trial {trial.number} of {record.name!r} is not running", code="trial_not_running")
    return lease


def _renew(db: Database, trial_id: int, policy: LeasePolicy) -> bool:
    with db.session() as session, session.begin():
        result = session.execute(
            update(TrialLease)
            .where(TrialLease.trial_id == trial_id, TrialLease.status == "active")
            .values(expires_at=utcnow() + timedelta(seconds=policy.lease_s))
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def report(
    db: Database, name: str, number: int, step: int, value: float, *, policy: LeasePolicy | None = None
) -> bool:
    """Record an intermediate value, renew the lease and ask the study's pruner.

    Returns:
        True when the trial should be pruned.
    """
    policy = policy or LeasePolicy()
    record = load_record(db, name)
    definition = definition_of(record)
    if definition.multi_objective:
        raise InvalidInput(
            "report: intermediate values are for single-objective studies only (as in Optuna)",
            code="multi_objective_report",
        )
    check_value(value, "value")
    trial = _frozen(db, record, number)
    lease = _check_running(db, record, trial)
    if lease is not None and not _renew(db, trial._trial_id, policy):
        _check_running(db, record, db.optuna.get_trial(trial._trial_id))
    db.optuna.set_trial_intermediate_value(trial._trial_id, step, value)
    study = _study(db, record, definition)
    return bool(study.pruner.prune(study, db.optuna.get_trial(trial._trial_id)))


def heartbeat(db: Database, name: str, number: int, *, policy: LeasePolicy | None = None) -> None:
    """Keep a trial's lease."""
    policy = policy or LeasePolicy()
    record = load_record(db, name)
    trial = _frozen(db, record, number)
    if not _renew(db, trial._trial_id, policy):
        _check_running(db, record, trial)


def check_value(value: float, field: str) -> None:
    if not math.isfinite(value):
        raise InvalidInput(f"{field}: must be a finite number (got {value})", code="non_finite_value")


# ---- tell ----------------------------------------------------------------------------------


def tell(
    db: Database,
    name: str,
    number: int,
    state: str,
    *,
    values: Sequence[float] | None = None,
    reason: str | None = None,
) -> TrialRead:
    """Finish a trial as ``complete`` (with values), ``pruned`` or ``fail``.

    Repeating a tell with the same final state and values returns the trial; anything else on a
    finished trial is ``trial_finished``, and on a reaped trial ``lease_lost``. A failed trial is
    re-queued with the same parameters while it has retries left.
    """
    record = load_record(db, name)
    definition = definition_of(record)
    if state not in _FINISHED_BY_NAME:
        raise InvalidInput(
            f"state: must be complete, pruned or fail (got {state!r})", code="validation_error"
        )
    final = _FINISHED_BY_NAME[state]
    n_objectives = len(definition.study_directions)
    if final == TrialState.COMPLETE:
        if values is None:
            raise InvalidInput("value: a complete trial needs value (or values)", code="validation_error")
        if len(values) != n_objectives:
            raise InvalidInput(
                f"values: the study has {n_objectives} objective(s), got {len(values)} value(s)",
                code="wrong_number_of_values",
            )
        try:
            check_finite(list(values))
        except ValueError as exc:
            raise InvalidInput(f"values: {exc}", code="non_finite_value") from None
    elif values is not None:
        raise InvalidInput(f"values: a {state} trial takes no values", code="validation_error")
    trial_id = _trial_id(db, record, number)
    if final != TrialState.FAIL:
        # No study lock: Optuna's row-locked state update decides a race with the reaper (or a
        # repeated tell), and each tell settles the study after its own commit.
        return _finish(db, record, definition, trial_id, number, final, values)
    # A failure re-queues a retry, which must not race an ask's budget count.
    with db.study_lock(record.id):
        trial = db.optuna.get_trial(trial_id)
        lease = _lease(db, trial_id)
        if trial.state.is_finished():
            return _told_before(definition, record, trial, lease, final, values)
        if trial.state != TrialState.RUNNING:
            raise Conflict(f"trial {number} of {name!r} is not running", code="trial_not_running")
        if reason:
            db.optuna.set_trial_user_attr(trial_id, FAIL_REASON, reason[:2000])
        finished = _study(db, record, definition).tell(number, state=final)
        _close_lease(db, trial_id, reason)
        _after_failure(db, record, definition, finished, lease)
        _settle_state(db, record, definition)
    if lease is not None:
        lease.status = "finished"
    return to_read(definition, finished, lease)


def _finish(
    db: Database,
    record: StudyRecord,
    definition: StudyDefinition,
    trial_id: int,
    number: int,
    final: TrialState,
    values: Sequence[float] | None,
) -> TrialRead:
    """Complete or prune a trial: Optuna's tell, the lease closed, the study settled."""
    try:
        finished = _study(db, record, definition).tell(
            number, values=list(values) if values is not None else None, state=final
        )
    except (UpdateFinishedTrialError, ValueError):
        trial = db.optuna.get_trial(trial_id)
        if trial.state.is_finished():
            return _told_before(definition, record, trial, _lease(db, trial_id), final, values)
        if trial.state != TrialState.RUNNING:
            raise Conflict(
                f"trial {number} of {record.name!r} is not running", code="trial_not_running"
            ) from None
        raise
    _close_lease(db, trial_id, None)
    _settle_state(db, record, definition)
    return to_read(definition, finished)


def _close_lease(db: Database, trial_id: int, reason: str | None) -> None:
    with db.session() as session, session.begin():
        session.execute(
            update(TrialLease)
            .where(TrialLease.trial_id == trial_id, TrialLease.status == "active")
            .values(status="finished", reason=reason[:2000] if reason else None)
        )


def _told_before(
    definition: StudyDefinition,
    record: StudyRecord,
    trial: FrozenTrial,
    lease: TrialLease | None,
    final: TrialState,
    values: Sequence[float] | None,
) -> TrialRead:
    """The answer to a tell on a finished trial: the same trial, lease_lost or trial_finished."""
    if lease is not None and lease.status in ("reaped", "released"):
        raise Conflict(
            f"trial {trial.number} of {record.name!r} lost its lease; its retry runs instead",
            code="lease_lost",
        )
    if trial.state == final and (
        final != TrialState.COMPLETE or list(trial.values or []) == list(values or [])
    ):
        return to_read(definition, trial, lease)
    raise Conflict(
        f"trial {trial.number} of {record.name!r} already finished as {_STATE_NAMES[trial.state]}",
        code="trial_finished",
    )


def _after_failure(
    db: Database,
    record: StudyRecord,
    definition: StudyDefinition,
    trial: FrozenTrial,
    lease: TrialLease | None,
    *,
    handed_back: bool = False,
) -> None:
    """Re-queue a failed trial with the same parameters while it has retries left."""
    attempt = lease.attempt if lease is not None else int(trial.user_attrs.get(ATTEMPT, 0))
    next_attempt = attempt if handed_back else attempt + 1
    if next_attempt > definition.budget.max_retries:
        return
    study = optuna.Study(study_name=record.name, storage=db.optuna)
    study.enqueue_trial(
        dict(trial.params), user_attrs={RETRY_OF: trial.number, ATTEMPT: next_attempt}, skip_if_exists=False
    )


def _settle_state(db: Database, record: StudyRecord, definition: StudyDefinition) -> None:
    """Move the study to ``failed`` or ``completed`` when its trials say so (call under the study lock)."""
    trials = all_trials(db, record)
    counts = _counts(trials)
    with db.session() as session, session.begin():
        current = get_record(session, record.name)
        if current.state in ("failed", "completed"):
            return
        if _fail_count(trials) > definition.budget.max_failed_trials:
            set_state(session, current, "failed")
        elif (
            counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] >= definition.budget.n_trials
            and counts[TrialState.RUNNING] == 0
            and counts[TrialState.WAITING] == 0
            and current.state != "paused"
        ):
            set_state(session, current, "completed")


# ---- reaping and handing back --------------------------------------------------------------


def reap(db: Database, *, now: datetime | None = None) -> int:
    """Fail every trial whose lease lapsed or that ran past ``trial_timeout_s``; re-queue retries.

    Safe to call from every server process and worker at once.

    Returns:
        The number of trials reaped.
    """
    now = now or utcnow()
    with db.session() as session:
        due = list(
            session.scalars(
                select(TrialLease).where(
                    TrialLease.status == "active",
                    (TrialLease.expires_at < now) | (TrialLease.deadline_at < now),
                )
            )
        )
    reaped = _reap_orphans(db)
    for study_id in sorted({lease.study_id for lease in due}):
        with db.session() as session:
            record = session.get(StudyRecord, study_id)
        if record is None:
            continue
        definition = definition_of(record)
        with db.study_lock(study_id):
            for lease in (item for item in due if item.study_id == study_id):
                reaped += _reap_one(db, record, definition, lease.trial_id, now)
            _settle_state(db, record, definition)
    return reaped


def _reap_orphans(db: Database) -> int:
    """Recover trials asked through caviar whose lease row never got written (a crash mid-ask).

    An ask writes the lease before it releases the study lock, so under that lock a running trial
    marked as asked but without a lease can only be the leftover of an ask that died half-way.
    """
    with db.session() as session:
        records = list(
            session.scalars(select(StudyRecord).where(StudyRecord.state.in_(("running", "paused"))))
        )
    reaped = 0
    for record in records:
        stale = [t for t in all_trials(db, record, [TrialState.RUNNING]) if t.user_attrs.get(ASKED)]
        if not stale:
            continue
        leased = _leases_for(db, [t._trial_id for t in stale])
        orphans = [t for t in stale if t._trial_id not in leased]
        if not orphans:
            continue
        definition = definition_of(record)
        with db.study_lock(record.id):
            for trial in orphans:
                if _lease(db, trial._trial_id) is not None:
                    continue
                current = db.optuna.get_trial(trial._trial_id)
                if current.state != TrialState.RUNNING:
                    continue
                db.optuna.set_trial_user_attr(trial._trial_id, FAIL_REASON, "lost while being handed out")
                db.optuna.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                _after_failure(db, record, definition, db.optuna.get_trial(trial._trial_id), None)
                reaped += 1
            _settle_state(db, record, definition)
    return reaped


def _reap_one(
    db: Database, record: StudyRecord, definition: StudyDefinition, trial_id: int, now: datetime
) -> int:
    lease = _lease(db, trial_id)
    if lease is None or lease.status != "active":
        return 0
    timed_out = lease.deadline_at is not None and lease.deadline_at < now
    if not timed_out and lease.expires_at >= now:
        return 0  # renewed meanwhile
    reason = "trial timeout" if timed_out else "lease expired (no heartbeat)"
    try:
        trial = db.optuna.get_trial(trial_id)
    except KeyError:
        trial = None
    status = "finished"
    if trial is not None and not trial.state.is_finished():
        with contextlib.suppress(UpdateFinishedTrialError):  # a tell may win the race
            db.optuna.set_trial_user_attr(trial_id, FAIL_REASON, reason)
            db.optuna.set_trial_state_values(trial_id, TrialState.FAIL)
            status = "reaped"
    with db.session() as session, session.begin():
        session.execute(
            update(TrialLease).where(TrialLease.trial_id == trial_id).values(status=status, reason=reason)
        )
    if status != "reaped" or trial is None:
        return 0
    _after_failure(db, record, definition, db.optuna.get_trial(trial_id), lease)
    return 1


def release(db: Database, name: str, number: int, *, reason: str = "handed back by worker") -> None:
    """Hand a running trial back: it is failed and re-queued without using up a retry."""
    record = load_record(db, name)
    definition = definition_of(record)
    trial = _frozen(db, record, number)
    with db.study_lock(record.id):
        trial = db.optuna.get_trial(trial._trial_id)
        lease = _lease(db, trial._trial_id)
        if trial.state != TrialState.RUNNING:
            return
        db.optuna.set_trial_user_attr(trial._trial_id, FAIL_REASON, reason)
        db.optuna.set_trial_user_attr(trial._trial_id, RELEASED, True)
        db.optuna.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        with db.session() as session, session.begin():
            session.execute(
                update(TrialLease)
                .where(TrialLease.trial_id == trial._trial_id)
                .values(status="released", reason=reason)
            )
        _after_failure(db, record, definition, db.optuna.get_trial(trial._trial_id), lease, handed_back=True)
        _settle_state(db, record, definition)


# ---- reads ---------------------------------------------------------------------------------


def _leases_for(db: Database, trial_ids: Sequence[int]) -> dict[int, TrialLease]:
    if not trial_ids:
        return {}
    with db.session() as session:
        rows = session.scalars(select(TrialLease).where(TrialLease.trial_id.in_(list(trial_ids))))
        return {lease.trial_id: lease for lease in rows}


def list_trials(
    db: Database, name: str, *, state: str | None = None, limit: int = 100, offset: int = 0
) -> TrialList:
    """Trials of a study ordered by number, optionally of one state."""
    record = load_record(db, name)
    definition = definition_of(record)
    states = None
    if state is not None:
        states = [s for s, n in _STATE_NAMES.items() if n == state]
    trials = sorted(all_trials(db, record, states), key=lambda t: t.number)
    page = trials[offset : offset + limit]
    leases = _leases_for(db, [t._trial_id for t in page])
    return TrialList(items=[to_read(definition, t, leases.get(t._trial_id)) for t in page], total=len(trials))


def get_trial(db: Database, name: str, number: int) -> TrialRead:
    """One trial with its intermediate values."""
    record = load_record(db, name)
    trial = _frozen(db, record, number)
    return to_read(definition_of(record), trial, _lease(db, trial._trial_id))


def _completed(db: Database, name: str) -> tuple[StudyRecord, StudyDefinition, list[FrozenTrial]]:
    """A study with its complete trials; NotFound (``no_completed_trials``) when it has none."""
    record = load_record(db, name)
    complete = [t for t in all_trials(db, record, [TrialState.COMPLETE]) if t.values is not None]
    if not complete:
        raise NotFound(f"study {name!r} has no completed trials yet", code="no_completed_trials")
    return record, definition_of(record), complete


def best(db: Database, name: str) -> TrialRead | ParetoTrials:
    """The best complete trial, or the Pareto front of a multi-objective study."""
    _, definition, complete = _completed(db, name)
    if definition.multi_objective:
        front = pareto_front(complete, definition.study_directions)
        leases = _leases_for(db, [t._trial_id for t in front])
        return ParetoTrials(trials=[to_read(definition, t, leases.get(t._trial_id)) for t in front])
    top = ranked(definition, complete)[0]
    return to_read(definition, top, _lease(db, top._trial_id))


def importances(db: Database, name: str) -> dict[str, float]:
    """Parameter importances by Optuna's default evaluator, with decoded names ({} below 2 trials)."""
    record = load_record(db, name)
    definition = definition_of(record)
    complete = all_trials(db, record, [TrialState.COMPLETE])
    if len(complete) < 2 or definition.multi_objective:
        return {}
    study = optuna.Study(study_name=record.name, storage=db.optuna)
    try:
        raw = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):
        return {}  # e.g. no parameter shared by every complete trial
    return {_decoded_name(definition, key): float(value) for key, value in raw.items()}


def _decoded_name(definition: StudyDefinition, stored: str) -> str:
    for key, param in definition.search_space.items():
        if stored_name(key, param) == stored:
            return key
    return stored


# ---- refine (coarse to fine) ---------------------------------------------------------------


def refine(
    db: Database,
    name: str,
    *,
    top_fraction: float = 0.2,
    min_top: int = 3,
    margin: float = 0.25,
    n_trials: int | None = None,
) -> StudyRecord:
    """Create ``<name>-refined-N``: the space narrowed around the best trials, in each parameter's scale."""
    from service.studies.service import create_study

    _, definition, complete = _completed(db, name)
    if definition.multi_objective:
        top = pareto_front(complete, definition.study_directions)
    else:
        top = ranked(definition, complete)[: max(min_top, math.ceil(top_fraction * len(complete)))]
    decoded = [decode_params(definition.search_space, t.params) for t in top]
    space = narrow_space(definition, decoded, margin)
    data = definition.model_dump(mode="json")
    data["search_space"] = space
    if n_trials is not None:
        data["budget"]["n_trials"] = n_trials
    base = f"{name}-refined-"
    with db.session() as session:
        existing = session.scalars(select(StudyRecord.name).where(StudyRecord.name.startswith(base))).all()
    taken = {int(n[len(base) :]) for n in existing if n[len(base) :].isdigit()}
    index = next(i for i in range(1, len(taken) + 2) if i not in taken)
    data["name"] = f"{base}{index}"
    data["tags"] = {**data.get("tags", {}), "refined_from": name}
    from service.studies.service import parse_definition

    return create_study(db, parse_definition(data))


def narrow_space(definition: StudyDefinition, top: list[dict[str, Any]], margin: float) -> dict[str, Any]:
    """The search space (as JSON) narrowed to the envelope of ``top`` widened by ``margin``."""
    space: dict[str, Any] = {}
    for key, param in definition.search_space.items():
        spec = param.model_dump(mode="json", exclude_none=True)
        seen = [p[key] for p in top if key in p]
        dist = param.distribution()
        if not seen:
            space[key] = spec
            continue
        if isinstance(dist, CategoricalDistribution):
            spec["choices"] = [c for c in dist.choices if c in seen]
        elif isinstance(dist, FloatDistribution | IntDistribution):
            lo, hi = _envelope(param, [float(v) for v in seen], margin)
            if isinstance(dist, IntDistribution):
                lo, hi = math.floor(lo), math.ceil(hi)
                if lo >= hi:
                    hi = min(param.high, lo + 1)  # type: ignore[union-attr]
                    lo = max(param.low, hi - 1)  # type: ignore[union-attr]
            spec["low"], spec["high"] = lo, hi
        space[key] = spec
    # conditions must still name surviving parent choices
    for key, spec in list(space.items()):
        when = spec.get("when")
        if not when:
            continue
        for parent, allowed in list(when.items()):
            kept = [v for v in allowed if v in space.get(parent, {}).get("choices", [])]
            when[parent] = kept
        if any(not allowed for allowed in when.values()):
            del space[key]
    return space


def _identity(x: float) -> float:
    return x


_SCALES: dict[str, tuple[Callable[[float], float], Callable[[float], float]]] = {
    "linear": (_identity, _identity),
    "log": (math.log, math.exp),
    "reverse_log": (lambda x: math.log(1.0 - x), lambda y: 1.0 - math.exp(y)),
}


def _envelope(param: Any, seen: list[float], margin: float) -> tuple[float, float]:
    """Widened envelope of ``seen`` in the parameter's own scale, clipped to its bounds."""
    low, high = float(param.low), float(param.high)
    scale = getattr(param, "scale", "linear")
    fwd, inv = _SCALES[scale]
    points = [fwd(v) for v in seen]
    bounds = sorted((fwd(low), fwd(high)))
    lo, hi = min(points), max(points)
    width = hi - lo if hi > lo else 0.1 * (bounds[1] - bounds[0])
    lo, hi = max(bounds[0], lo - margin * width), min(bounds[1], hi + margin * width)
    a, b = sorted((inv(lo), inv(hi)))
    a, b = max(low, a), min(high, b)
    if scale == "reverse_log":
        b = min(b, math.nextafter(1.0, 0.0))
    if a >= b:
        a, b = low, high
    return a, b
