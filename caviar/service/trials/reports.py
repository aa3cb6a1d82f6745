"""Reports: intermediate values of running trials, one at a time or a fused group's epoch at once.

Plain functions over a :class:`~caviar.service.db.Database`, called by the REST API. A report keeps
its trial's lease and asks the study's pruner (Optuna's) whether the trial goes on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial

from caviar.service.db import Database
from caviar.service.definition import StudyDefinition
from caviar.service.errors import Conflict, InvalidInput, NotFound
from caviar.service.store import (
    STOPPED_STATES,
    LeaseOf,
    LeasePolicy,
    check_running,
    definition_of,
    no_trial,
    prune_reported,
    renew,
    reported_trials,
    row_and_lease,
    row_and_leases,
    set_intermediate_values,
    study_handle,
)
from caviar.service.trials.leases import ANYONE, Caller, check_owner
from caviar.storage import StudyRecord, TrialLease


def report(
    db: Database,
    name: str,
    number: int,
    step: int,
    value: float,
    *,
    policy: LeasePolicy,
    caller: Caller = ANYONE,
) -> bool:
    """Record an intermediate value, keep the lease and ask the study's pruner.

    The lease is renewed once less than one heartbeat interval (half the lease) is left, by the
    database's clock: a lease outlives reports that come less than a lease apart, as when every
    report renewed it, and frequent reports leave the lease connections to the heartbeats.

    Returns:
        True when the trial should be pruned, or its study is stopping.
    """
    recorded = _record_value(db, name, number, step, value, policy=policy, caller=caller)
    return _should_prune(db, recorded)


@dataclass(frozen=True)
class _Recorded:
    """A value just stored: the study's row as the report read it, and the trial's id."""

    record: StudyRecord
    definition: StudyDefinition
    trial_id: int


def _record_value(
    db: Database, name: str, number: int, step: int, value: float, *, policy: LeasePolicy, caller: Caller
) -> _Recorded:
    """:func:`report` up to the pruner: check, renew the lease if due, store the value."""
    record, tid, lease, fresh = row_and_lease(db, name, number, fresh_for_s=policy.heartbeat_interval_s)
    done = _check_report(db, record, (tid, lease, fresh), number, value, policy=policy, caller=caller)
    try:  # an active lease means a running trial; Optuna refuses a finished one (told elsewhere)
        db.optuna.set_trial_intermediate_value(tid, step, value)
    except UpdateFinishedTrialError:
        check_running(db, record, db.optuna.get_trial(tid))
        raise
    return done


def _check_report(
    db: Database,
    record: StudyRecord,
    leased: LeaseOf,
    number: int,
    value: float,
    *,
    policy: LeasePolicy,
    caller: Caller,
) -> _Recorded:
    """:func:`_record_value` up to the write, once the row and the trial's lease (``leased``) are
    read: check the value, the lease and its owner, renew the lease if due."""
    tid, lease, fresh = leased
    definition = definition_of(record)
    if definition.multi_objective:
        raise InvalidInput(
            "report: intermediate values are for single-objective studies only (as in Optuna)",
            code="multi_objective_report",
        )
    check_value(value, "value")
    if lease is None or lease.status != "active":  # the trial itself says why (or runs unleased)
        lease = check_running(db, record, db.optuna.get_trial(tid))
    check_owner(record, number, lease, caller)
    if lease is not None and not fresh and not renew(db, tid, policy):
        check_running(db, record, db.optuna.get_trial(tid))
    return _Recorded(record, definition, tid)


def _should_prune(
    db: Database, recorded: _Recorded, study: optuna.Study | None = None, trial: FrozenTrial | None = None
) -> bool:
    """The pruner's answer for a value just recorded (``study``: its handle, if the caller has one;
    ``trial``: as read since the value was stored, if it was)."""
    if recorded.record.state in STOPPED_STATES:
        return True  # the study is stopping: every running trial ends at its next report
    study = study or study_handle(db, recorded.record, recorded.definition)
    if isinstance(study.pruner, optuna.pruners.NopPruner):
        return False
    return prune_reported(db, study, recorded.trial_id, trial)


@dataclass(frozen=True)
class Reported:
    """One report of a batch (:func:`report_many`): the trial, its step and value, and the proof of
    its claim (None: the caller acts on any trial)."""

    number: int
    step: int
    value: float
    proves: Callable[[TrialLease], bool] | None = None


@dataclass(frozen=True)
class ReportResult:
    """What became of one report of a batch: the pruner's answer, or why it was not recorded."""

    number: int
    step: int
    should_prune: bool
    code: str | None = None
    message: str | None = None


BATCH_ERRORS = frozenset(
    {"lease_lost", "trial_finished", "trial_not_running", "not_your_trial", "trial_not_found"}
)
"""The errors that belong to one trial of a batch: it is answered with its code, the others go on."""


def report_many(
    db: Database, name: str, reports: Sequence[Reported], *, policy: LeasePolicy, worker_id: str | None = None
) -> list[ReportResult]:
    """Record intermediate values of several trials of one study, each as :func:`report` records
    one, and ask the pruner about each in the batch's order, in one call.

    A fused group sends its members' values of one epoch this way: one request instead of one per
    member. Every value is checked before any is recorded; a trial that cannot take its value (its
    lease lost, not its caller's, ...) is answered with that error's code and ``should_prune``, and
    the others are recorded. The values are stored first and the pruner asked after, in order, with
    one read of the reported trials: Optuna's pruners rate a trial by its own values, the complete
    trials' and the rung values the pruner itself stores, never by another running trial's values,
    so this answers what reporting one by one would. A trial named twice is reported one by one
    (its second value must not be seen by the pruner's answer for its first).

    Raises:
        InvalidInput: a non-finite value (``reports[i].value``, nothing recorded), or a
            multi-objective study.
        NotFound: ``study_not_found``.
    """
    for i, item in enumerate(reports):
        check_value(item.value, f"reports[{i}].value")
    if len({item.number for item in reports}) < len(reports):
        return [
            result
            for item in reports
            for result in report_many(db, name, [item], policy=policy, worker_id=worker_id)
        ]
    record, leases = row_and_leases(
        db, name, [item.number for item in reports], fresh_for_s=policy.heartbeat_interval_s
    )
    results: list[ReportResult | None] = []
    checked: list[tuple[int, _Recorded]] = []
    for item in reports:
        caller = Caller(worker_id, any_trial=item.proves is None, proves=item.proves)
        try:
            leased = leases.get(item.number)
            if leased is None:
                raise no_trial(name, item.number)
            done = _check_report(db, record, leased, item.number, item.value, policy=policy, caller=caller)
        except (Conflict, NotFound) as exc:
            if exc.code not in BATCH_ERRORS:
                raise
            results.append(ReportResult(item.number, item.step, True, exc.code, exc.message))
            continue
        checked.append((len(results), done))
        results.append(None)
    # every value in one transaction; a trial that finished since its check keeps what it has
    finished = set_intermediate_values(
        db, [(done.trial_id, reports[index].step, reports[index].value) for index, done in checked]
    )
    recorded: list[tuple[int, _Recorded]] = []
    for index, done in checked:
        if done.trial_id not in finished:
            recorded.append((index, done))
            continue
        item = reports[index]
        try:
            check_running(db, record, db.optuna.get_trial(done.trial_id))
        except (Conflict, NotFound) as exc:
            if exc.code not in BATCH_ERRORS:
                raise
            results[index] = ReportResult(item.number, item.step, True, exc.code, exc.message)
            continue
        raise UpdateFinishedTrialError(f"trial {item.number} finished while its report was stored")
    if recorded:
        last = recorded[-1][1]
        study = study_handle(db, last.record, last.definition)
        trials = reported_trials(db, study, [done.trial_id for _, done in recorded])
        for index, done in recorded:
            item = reports[index]
            results[index] = ReportResult(
                item.number, item.step, _should_prune(db, done, study, trials.get(done.trial_id))
            )
    return [result for result in results if result is not None]


def check_value(value: float, field: str) -> None:
    if not math.isfinite(value):
        raise InvalidInput(f"{field}: must be a finite number (got {value})", code="non_finite_value")
