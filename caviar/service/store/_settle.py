"""Study state changes driven by its trials: settle (completed, failed, stopped), and end a study
(stopped by a person, its goal or its deadline).

Called under the study lock by every path that ends a trial badly (a fail tell, the reaper, a
hand-back), by every tell that may complete the study, and by the steering of a study (edit,
resume, stop).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from optuna.exceptions import UpdateFinishedTrialError
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from caviar.service.db import Database
from caviar.service.definition import StudyDefinition
from caviar.service.store._budget import budget_spent, fail_count
from caviar.service.store._records import all_trials, definition_of, reload, transition
from caviar.service.store._states import ACTIVE_STATES, CANCELLED, FAIL_REASON, FINAL_STATES
from caviar.service.store._tables import record_with_counts
from caviar.storage import StudyRecord, utcnow


def settle_study(db: Database, record: StudyRecord) -> None:
    """Move the study on when its trials say so: stopped, failed, ended by its goal or deadline,
    or completed.

    Safe with or without the study lock (every move is a compare-and-set on the state; ending by
    goal or deadline takes the lock itself). The state and the trial counts are read in one
    statement (one snapshot), so a stop that races the last running trial's tell is settled by one
    of the two. The trials are counted by the database; only failures beyond ``max_failed_trials``
    are loaded (to leave out hand-backs and cancelled trials).
    """
    current, counts = record_with_counts(db, record)  # one statement: the state and the counts agree
    if current.state in FINAL_STATES:
        return
    definition = definition_of(current)
    if current.state == "stopping":
        if counts[TrialState.RUNNING] == 0 and counts[TrialState.WAITING] == 0:
            transition(db, current, ["stopping"], "stopped")
        elif counts[TrialState.RUNNING] == 0:
            end_study(db, current, current.stop_reason or "stopped")  # waiting trials came in since
        return
    max_failed = definition.budget.max_failed_trials
    if counts[TrialState.FAIL] > max_failed and (
        fail_count(all_trials(db, current, [TrialState.FAIL])) > max_failed
    ):
        transition(db, current, ACTIVE_STATES, "failed")
        return
    reason = end_reason(db, definition, current)
    if reason is not None:
        end_study(db, current, reason)
        return
    if (
        budget_spent(counts, definition.budget.n_trials)
        and counts[TrialState.RUNNING] == 0
        and counts[TrialState.WAITING] == 0
    ):
        transition(db, current, ["queued", "running"], "completed")


def end_reason(
    db: Database, definition: StudyDefinition, record: StudyRecord, now: datetime | None = None
) -> str | None:
    """Why the study must end now: its goal is reached or its deadline passed (else None).

    The goal is checked against Optuna's best trial (one indexed query, not the history).
    """
    goal = definition.budget.goal
    if goal is not None:
        try:
            best = db.optuna.get_best_trial(record.optuna_study_id)
        except ValueError:  # no complete trial yet
            best = None
        if best is not None and best.values:
            value = best.values[0]
            maximize = definition.study_directions[0] == StudyDirection.MAXIMIZE
            if (value >= goal.value) if maximize else (value <= goal.value):
                sign = ">=" if maximize else "<="
                metric = definition.metrics[0]
                return f"goal reached: trial {best.number} {metric}={value:.6g} {sign} {goal.value:g}"
    return deadline_passed(definition, record, now)


def deadline_passed(
    definition: StudyDefinition, record: StudyRecord, now: datetime | None = None
) -> str | None:
    """The stop reason when ``budget.max_duration_s`` has passed since the first trial was claimed."""
    limit = definition.budget.max_duration_s
    if limit is None or record.started_at is None:
        return None
    if (now or utcnow()) < record.started_at + timedelta(seconds=limit):
        return None
    return f"deadline: budget.max_duration_s={limit:g} s passed since the first trial"


def end_study(db: Database, record: StudyRecord, reason: str) -> bool:
    """End a study: no new trials, waiting ones cancelled, running ones told to stop.

    The study becomes ``stopping`` while trials still run (their next report answers
    ``should_prune: true``, their heartbeat ``409 study_stopped``), and ``stopped`` once none does.
    Waiting trials (retries, enqueued trials) are failed through Optuna's storage with the reason
    ``cancelled: ...``; they count neither against the budget nor as failures.

    Returns:
        Whether this call ended it (False when it was not queued, running, paused or stopping).
    """
    with db.study_lock(record.id):
        current = reload(db, record)
        if current.state in ACTIVE_STATES:
            if not transition(db, current, ACTIVE_STATES, "stopping", stop_reason=reason[:2000]):
                return False
        elif current.state != "stopping":
            return False
        trials = all_trials(db, current, [TrialState.WAITING, TrialState.RUNNING])
        for trial in trials:
            if trial.state == TrialState.WAITING:
                cancel_waiting(db, trial, f"cancelled: {reason}")
        if not any(t.state == TrialState.RUNNING for t in all_trials(db, current, [TrialState.RUNNING])):
            transition(db, current, ["stopping"], "stopped")
    return True


def cancel_waiting(db: Database, trial: FrozenTrial, reason: str) -> None:
    """Fail a waiting trial that will never run (call under the study lock: asks move waiting
    trials to running under it)."""
    try:
        db.optuna.set_trial_user_attr(trial._trial_id, FAIL_REASON, reason[:2000])
        db.optuna.set_trial_user_attr(trial._trial_id, CANCELLED, True)
        db.optuna.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return
