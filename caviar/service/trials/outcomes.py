"""What a tell may name (:func:`final_state`), what a failed trial does (it is retried with the
same parameters while it has retries left), and what a tell on a finished trial answers.

Called under the study lock by every path that ends a trial badly (a fail tell, the reaper, a
hand-back); the study then settles (:func:`caviar.service.store.settle_study`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from caviar.service.db import Database
from caviar.service.definition import StudyDefinition, check_finite
from caviar.service.errors import Conflict, InvalidInput
from caviar.service.store import (
    ATTEMPT,
    FINISHED_BY_NAME,
    RETRY_OF,
    STATE_NAMES,
    STOPPED_STATES,
    lease_error,
    reload,
    set_user_attrs,
)
from caviar.service.trials.reads import to_read
from caviar.service.trials.schemas import TrialRead
from caviar.storage import StudyRecord, TrialLease


def final_state(definition: StudyDefinition, state: str, values: Sequence[float] | None) -> TrialState:
    """The end a tell names (``complete`` with one finite value per objective, ``pruned`` or
    ``fail`` without values), checked.

    Raises:
        InvalidInput: naming the field: ``validation_error``, ``wrong_number_of_values`` or
            ``non_finite_value``.
    """
    if state not in FINISHED_BY_NAME:
        raise InvalidInput(
            f"state: must be complete, pruned or fail (got {state!r})", code="validation_error"
        )
    final = FINISHED_BY_NAME[state]
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
    return final


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


def record_attrs(db: Database, record: StudyRecord, tid: int, attrs: Mapping[str, Any]) -> None:
    """Store user attributes on a running trial, in one transaction (a finished one keeps what it
    has: the reaper, or a concurrent tell, finished it; the tell decides after this)."""
    with contextlib.suppress(UpdateFinishedTrialError):
        set_user_attrs(db, tid, attrs)


def told_before(
    definition: StudyDefinition,
    record: StudyRecord,
    trial: FrozenTrial,
    lease: TrialLease | None,
    final: TrialState,
    values: Sequence[float] | None,
) -> TrialRead:
    """The answer to a tell on a finished trial: the same trial, lease_lost or trial_finished."""
    if lease is not None and lease_error(lease) == "lease_lost":
        raise Conflict(
            f"trial {trial.number} of {record.name!r} lost its lease; its retry runs instead",
            code="lease_lost",
        )
    if trial.state == final and (
        final != TrialState.COMPLETE or list(trial.values or []) == list(values or [])
    ):
        return to_read(definition, trial, lease)
    raise Conflict(
        f"trial {trial.number} of {record.name!r} already finished as {STATE_NAMES[trial.state]}",
        code="trial_finished",
    )
