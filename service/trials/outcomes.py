"""What a finished trial does to its study: failed trials are retried, and the study settles.

Called under the study lock by every path that ends a trial badly (a fail tell, the reaper, a
hand-back) and by every tell that may complete the study.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from caviar.service.db import Database
from caviar.service.definition import StudyDefinition
from caviar.service.studies.service import all_trials, get_record, set_state
from caviar.service.trials._core import ATTEMPT, RETRY_OF, fail_count, state_counts
from caviar.storage import StudyRecord, TrialLease


def requeue_retry(
    db: Database,
    record: StudyRecord,
    definition: StudyDefinition,
    trial: FrozenTrial,
    lease: TrialLease | None,
    *,
    handed_back: bool = False,
) -> None:
    """Re-queue a failed trial with the same parameters while it has retries left.

    A hand-back (a stopping worker, an out-of-memory group) keeps the attempt count: it is not
    the trial's fault.
    """
    attempt = lease.attempt if lease is not None else int(trial.user_attrs.get(ATTEMPT, 0))
    next_attempt = attempt if handed_back else attempt + 1
    if next_attempt > definition.budget.max_retries:
        return
    study = optuna.Study(study_name=record.name, storage=db.optuna)
    study.enqueue_trial(
        dict(trial.params), user_attrs={RETRY_OF: trial.number, ATTEMPT: next_attempt}, skip_if_exists=False
    )


def settle_study(db: Database, record: StudyRecord, definition: StudyDefinition) -> None:
    """Move the study to ``failed`` or ``completed`` when its trials say so (call under the study lock)."""
    trials = all_trials(db, record)
    counts = state_counts(trials)
    with db.session() as session, session.begin():
        current = get_record(session, record.name)
        if current.state in ("failed", "completed"):
            return
        if fail_count(trials) > definition.budget.max_failed_trials:
            set_state(session, current, "failed")
        elif (
            counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] >= definition.budget.n_trials
            and counts[TrialState.RUNNING] == 0
            and counts[TrialState.WAITING] == 0
            and current.state != "paused"
        ):
            set_state(session, current, "completed")
