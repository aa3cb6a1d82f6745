"""What a failed trial does: it is retried with the same parameters while it has retries left.

Called under the study lock by every path that ends a trial badly (a fail tell, the reaper, a
hand-back); the study then settles (:func:`caviar.service.store.settle_study`).
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

from caviar.service.db import Database
from caviar.service.definition import StudyDefinition
from caviar.service.store import ATTEMPT, RETRY_OF, STOPPED_STATES, reload
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
    the trial's fault. A stopping or stopped study retries nothing.
    """
    attempt = lease.attempt if lease is not None else int(trial.user_attrs.get(ATTEMPT, 0))
    next_attempt = attempt if handed_back else attempt + 1
    if next_attempt > definition.budget.max_retries:
        return
    if reload(db, record).state in STOPPED_STATES:
        return
    study = optuna.Study(study_name=record.name, storage=db.optuna)
    study.enqueue_trial(
        dict(trial.params), user_attrs={RETRY_OF: trial.number, ATTEMPT: next_attempt}, skip_if_exists=False
    )
