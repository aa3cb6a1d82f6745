"""Trial reads: one trial, or a study's trials, as the API shows them (parameters decoded)."""

from __future__ import annotations

from optuna.trial import FrozenTrial, TrialState

from caviar.service.db import Database
from caviar.service.definition import StudyDefinition, decode_params
from caviar.service.store import (
    FAIL_REASON,
    RETRY_OF,
    STATE_NAMES,
    WORKER,
    all_trials,
    definition_of,
    frozen,
    lease_of,
    leases_for,
    load_record,
    states_named,
    utc,
)
from caviar.service.trials.schemas import TrialList, TrialRead
from caviar.storage import TrialLease


def to_read(definition: StudyDefinition, trial: FrozenTrial, lease: TrialLease | None = None) -> TrialRead:
    """A frozen Optuna trial as the API shows it."""
    values = list(trial.values) if trial.values is not None else None
    retry_of = lease.retry_of if lease is not None else trial.user_attrs.get(RETRY_OF)
    return TrialRead(
        number=trial.number,
        state=STATE_NAMES.get(trial.state, "fail"),
        params=decode_params(
            definition.search_space, trial.params or trial.system_attrs.get("fixed_params", {})
        ),
        value=values[0] if values is not None and len(values) == 1 else None,
        values=values,
        intermediate_values=dict(trial.intermediate_values),
        user_attrs={k: v for k, v in trial.user_attrs.items() if not k.startswith("caviar:")},
        worker_id=lease.worker_id if lease is not None else trial.user_attrs.get(WORKER),
        started_at=utc(trial.datetime_start),
        finished_at=utc(trial.datetime_complete),
        retry_of=retry_of,
        fail_reason=trial.user_attrs.get(FAIL_REASON) if trial.state == TrialState.FAIL else None,
    )


def list_trials(
    db: Database, name: str, *, state: str | None = None, limit: int = 100, offset: int = 0
) -> TrialList:
    """Trials of a study ordered by number, optionally of one state."""
    record = load_record(db, name)
    definition = definition_of(record)
    states = None
    if state is not None:
        states = states_named(state)
    trials = sorted(all_trials(db, record, states), key=lambda t: t.number)
    page = trials[offset : offset + limit]
    leases = leases_for(db, [t._trial_id for t in page])
    return TrialList(items=[to_read(definition, t, leases.get(t._trial_id)) for t in page], total=len(trials))


def get_trial(db: Database, name: str, number: int) -> TrialRead:
    """One trial with its intermediate values."""
    record = load_record(db, name)
    trial = frozen(db, record, number)
    return to_read(definition_of(record), trial, lease_of(db, trial._trial_id))
