"""Optuna's storage API on the service's database, with caviar's guarantees.

Plain functions over a :class:`~caviar.service.db.Database` that the REST adapter
(:mod:`.router`) calls for ``caviar.optuna_storage``. Every read and write goes through Optuna's
RDB storage API (never SQL into Optuna's tables); around it caviar keeps its promises:

- a study created here is a caviar study (objective kind ``external``, no declared search space), so
  REST, the CLI, the dashboard and the metrics see it;
- a trial that uses the budget (running, waiting, complete or pruned) is refused past the study's
  ``budget.n_trials`` (``budget_exhausted``), under the same study lock as caviar's asks, so the
  budget is exact across every client;
- a running trial holds a caviar lease (:mod:`caviar.service.trials.leases`): the client's
  heartbeats renew it, and when they stop the reaper fails the trial and re-queues it with the same
  parameters (``budget.max_retries``), as for any caviar trial.

Optuna's exceptions become caviar's domain errors (see :func:`optuna_errors`), and the client turns
them back into Optuna's.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.storages._base import DEFAULT_STUDY_NAME_PREFIX
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from caviar.service.db import Database
from caviar.service.definition import StudyDefinition
from caviar.service.errors import CaviarError, Conflict, InvalidInput, NotFound, RateLimited, parse_model
from caviar.service.store import (
    ATTEMPT,
    RETRY_OF,
    STOPPED_STATES,
    LeasePolicy,
    count_states,
    definition_of,
    end_told,
    reload,
    renew,
    settle_study,
    transition,
    used_count,
)
from caviar.service.store import study_of_trial as _study_of_trial
from caviar.service.studies import service as studies
from caviar.service.trials.leases import release
from caviar.storage import StudyRecord, TrialLease, utcnow

NO_BUDGET = 1_000_000
"""``budget.n_trials`` of a study created through the storage (the largest budget caviar allows):
set a real one with ``PATCH /api/v1/studies/{name}`` or create the study with caviar first."""
USES_BUDGET = (TrialState.RUNNING, TrialState.WAITING, TrialState.COMPLETE, TrialState.PRUNED)


class OptunaKeyError(NotFound):
    """Optuna's ``KeyError``: no such study or trial (or parameter)."""

    code = "optuna_key_error"


class OptunaValueError(InvalidInput):
    """Optuna's ``ValueError``: an incompatible distribution, no complete trial, ..."""

    code = "optuna_value_error"


class OptunaRuntimeError(Conflict):
    """Optuna's ``RuntimeError`` (a best trial of a multi-objective study)."""

    code = "optuna_runtime_error"


@contextlib.contextmanager
def optuna_errors() -> Iterator[None]:
    """Translate Optuna's exceptions into caviar's domain errors (codes the client maps back)."""
    try:
        yield
    except CaviarError:
        raise
    except DuplicatedStudyError as exc:
        raise Conflict(str(exc) or "a study with this name already exists", code="duplicated_study") from None
    except UpdateFinishedTrialError as exc:
        raise Conflict(str(exc) or "the trial is finished", code="update_finished_trial") from None
    except KeyError as exc:
        raise OptunaKeyError(str(exc.args[0]) if exc.args else "not found") from None
    except ValueError as exc:
        raise OptunaValueError(str(exc) or "invalid value") from None
    except RuntimeError as exc:
        raise OptunaRuntimeError(str(exc) or "not possible") from None


def rdb(db: Database) -> RDBStorage:
    """Optuna's RDB storage on the service's database (under the service's trial cache)."""
    storage = db.optuna
    backend = getattr(storage, "_backend", storage)
    assert isinstance(backend, RDBStorage)
    return backend


def record_of(db: Database, study_id: int) -> StudyRecord | None:
    """The caviar study of an Optuna study id (None for a study made outside caviar)."""
    with db.session() as session:
        return session.scalar(select(StudyRecord).where(StudyRecord.optuna_study_id == study_id))


def study_of_trial(db: Database, trial_id: int) -> int:
    """The Optuna study id of a trial (one read of Optuna's trial table), or OptunaKeyError."""
    with db.session() as session:
        study_id = _study_of_trial(session, trial_id)
    if study_id is None:
        raise OptunaKeyError(f"no trial with id {trial_id}")
    return int(study_id)


def budget_left(db: Database, record: StudyRecord | None) -> int | None:
    """Trials clients may still start: the new ones the budget allows plus the waiting ones
    (retries, enqueued trials). None for a study outside caviar."""
    if record is None:
        return None
    record = reload(db, record)
    counts = count_states(db, record)
    new = max(0, definition_of(record).budget.n_trials - used_count(counts))
    return new + counts[TrialState.WAITING]


# ---- studies -------------------------------------------------------------------------------


def create_study(db: Database, directions: Sequence[StudyDirection], name: str | None) -> tuple[int, str]:
    """Create an Optuna study and its caviar study (objective ``external``, no search space).

    Raises:
        Conflict: ``duplicated_study``.
        InvalidInput: a name caviar cannot serve (caviar's names match ``NAME_PATTERN``).
    """
    name = name if name is not None else DEFAULT_STUDY_NAME_PREFIX + str(uuid.uuid4())
    data: dict[str, Any] = {
        "name": name,
        "objective": {"kind": "external"},
        "search_space": {},
        "budget": {"n_trials": NO_BUDGET, "max_failed_trials": NO_BUDGET},
    }
    words = [d.name.lower() for d in directions]
    if len(words) == 1:
        data["direction"] = words[0]
    else:
        data["directions"] = words
    definition = parse_model(StudyDefinition, data)
    with db.session() as session:
        if session.scalar(select(StudyRecord.id).where(StudyRecord.name == name)) is not None:
            raise Conflict(f"a study named {name!r} already exists", code="duplicated_study")
    with optuna_errors():
        study_id = rdb(db).create_new_study(list(directions), name)
    try:
        record = StudyRecord(
            name=name,
            state="queued",
            definition=definition.model_dump(mode="json"),
            priority=definition.priority,
            objective_kind="external",
            optuna_study_id=study_id,
        )
        with db.session() as session, session.begin():
            session.add(record)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            rdb(db).delete_study(study_id)
        if isinstance(exc, IntegrityError):
            raise Conflict(f"a study named {name!r} already exists", code="duplicated_study") from None
        raise
    return study_id, name


def delete_study(db: Database, study_id: int) -> None:
    """Delete a study (its caviar study too, as ``DELETE /api/v1/studies/{name}`` does)."""
    record = record_of(db, study_id)
    if record is not None:
        studies.delete_study(db, record.name)
        return
    with optuna_errors():
        rdb(db).delete_study(study_id)


def set_study_attr(db: Database, study_id: int, kind: str, key: str, value: Any) -> None:
    with optuna_errors():
        if kind == "user":
            rdb(db).set_study_user_attr(study_id, key, value)
        else:
            rdb(db).set_study_system_attr(study_id, key, value)


def study_id_from_name(db: Database, name: str) -> int:
    with optuna_errors():
        return rdb(db).get_study_id_from_name(name)


def get_study(db: Database, study_id: int) -> FrozenStudy:
    """One study as Optuna's ``FrozenStudy`` (name, directions, attributes)."""
    storage = rdb(db)
    with optuna_errors():
        return FrozenStudy(
            study_name=storage.get_study_name_from_id(study_id),
            direction=None,
            directions=storage.get_study_directions(study_id),
            user_attrs=storage.get_study_user_attrs(study_id),
            system_attrs=storage.get_study_system_attrs(study_id),
            study_id=study_id,
        )


def all_studies(db: Database, *, limit: int, offset: int) -> list[FrozenStudy]:
    """A page of Optuna's ``get_all_studies``, ordered by study id."""
    with optuna_errors():
        studies_ = sorted(rdb(db).get_all_studies(), key=lambda s: s._study_id)
    return studies_[offset : offset + limit]


# ---- trials --------------------------------------------------------------------------------


def create_trial(
    db: Database,
    study_id: int,
    template: FrozenTrial | None,
    *,
    client_id: str | None,
    policy: LeasePolicy,
) -> tuple[FrozenTrial, int | None]:
    """Create a trial (``create_new_trial``), within the caviar study's budget, leased if running.

    Returns:
        The trial and how many more the budget allows.

    Raises:
        Conflict: ``budget_exhausted``; ``study_paused``, ``study_stopped`` or ``study_failed`` for a
            running or waiting trial.
        RateLimited: ``max_parallel_reached`` for a running trial.
    """
    record = record_of(db, study_id)
    if record is None:
        with optuna_errors():
            return rdb(db)._create_new_trial(study_id, template), None
    state = template.state if template is not None else TrialState.RUNNING
    with db.study_lock(record.id):
        record = reload(db, record)
        definition = definition_of(record)
        counts = count_states(db, record)
        if state in (TrialState.RUNNING, TrialState.WAITING):
            _check_open(record)
        if state in USES_BUDGET and used_count(counts) >= definition.budget.n_trials:
            raise Conflict(
                f"study {record.name!r} has used its budget of {definition.budget.n_trials} trials",
                code="budget_exhausted",
            )
        max_parallel = definition.budget.max_parallel
        if (
            state == TrialState.RUNNING
            and max_parallel is not None
            and counts[TrialState.RUNNING] >= max_parallel
        ):
            raise RateLimited(
                f"study {record.name!r} already runs {max_parallel} trials (max_parallel)",
                code="max_parallel_reached",
                retry_after_s=max(1, int(policy.heartbeat_interval_s / 2)),
            )
        with optuna_errors():
            trial = rdb(db)._create_new_trial(study_id, template)
        if state == TrialState.RUNNING:
            _lease(db, record, definition, trial, client_id, policy)
    if state.is_finished():
        settle_study(db, record)
    return trial, budget_left(db, record)


def _check_open(record: StudyRecord) -> None:
    if record.state == "paused":
        raise Conflict(f"study {record.name!r} is paused", code="study_paused")
    if record.state in STOPPED_STATES:
        raise Conflict(f"study {record.name!r} is {record.state}", code="study_stopped")
    if record.state == "failed":
        raise Conflict(f"study {record.name!r} failed: too many failed trials", code="study_failed")


def _lease(
    db: Database,
    record: StudyRecord,
    definition: StudyDefinition,
    trial: FrozenTrial,
    client_id: str | None,
    policy: LeasePolicy,
) -> None:
    """Start caviar's lease of a running trial (the study moves to running with its first)."""
    now = utcnow()
    timeout = definition.budget.trial_timeout_s
    retry_of = trial.user_attrs.get(RETRY_OF)
    lease = TrialLease(
        trial_id=trial._trial_id,
        study_id=record.id,
        number=trial.number,
        worker_id=client_id,
        status="active",
        attempt=int(trial.user_attrs.get(ATTEMPT, 0)),
        retry_of=int(retry_of) if retry_of is not None else None,
        started_at=now,
        expires_at=now + timedelta(seconds=policy.lease_s),
        deadline_at=now + timedelta(seconds=timeout) if timeout else None,
    )
    with db.session() as session, session.begin():
        session.merge(lease)
    if record.state == "queued":
        transition(db, record, ["queued"], "running", started_at=record.started_at or now)


def get_trials(
    db: Database, study_id: int, included: set[int], greater_than: int, states: Sequence[TrialState] | None
) -> list[FrozenTrial]:
    """Optuna's incremental read (``_get_trials``): unfinished trials named in ``included`` and
    every trial with an id above ``greater_than`` (what a client's trial cache needs)."""
    with optuna_errors():
        return rdb(db)._get_trials(study_id, states, included, greater_than)


def get_trial(db: Database, trial_id: int) -> FrozenTrial:
    with optuna_errors():
        return rdb(db).get_trial(trial_id)


def trial_id_from_number(db: Database, study_id: int, number: int) -> int:
    with optuna_errors():
        return rdb(db).get_trial_id_from_study_id_trial_number(study_id, number)


def best_trial_id(db: Database, study_id: int) -> int:
    storage = rdb(db)
    with optuna_errors():
        directions = storage.get_study_directions(study_id)
        if len(directions) > 1:
            raise RuntimeError("Best trial can be obtained only for single-objective optimization.")
        return storage._get_best_trial_id(study_id, directions[0])


def set_param(
    db: Database,
    trial_id: int,
    name: str,
    internal: float,
    distribution: BaseDistribution,
    previous: BaseDistribution | None,
) -> None:
    """Optuna's ``set_trial_param`` (``previous``: the distribution the client's cache holds for
    the name, which Optuna checks the new one against without reading the study)."""
    with optuna_errors():
        rdb(db)._set_trial_param(trial_id, name, internal, distribution, previous)


def set_state(
    db: Database,
    trial_id: int,
    state: TrialState,
    values: Sequence[float] | None,
    *,
    client_id: str | None,
    policy: LeasePolicy,
    prefetch: bool = False,
) -> tuple[int, bool, int | None, FrozenTrial | None]:
    """Optuna's ``set_trial_state_values``; a trial that starts running gets a lease, a trial
    that finishes closes it and settles its study.

    A failure told by the client is final, as in Optuna (only trials whose lease lapses are retried).

    With ``prefetch`` (the client's optimize loop goes on), a complete or pruned trial's end also
    starts the client's next trial under the study lock, while the budget allows one: the budget is
    then split between the clients as their trials end, so none of them is refused a trial it was
    told it could have (see :func:`prefetch_trial`).

    Returns:
        The trial's study id, whether the state changed, the budget left, and the prefetched trial.
    """
    study_id = study_of_trial(db, trial_id)
    record = record_of(db, study_id)
    lost = end_told(db, trial_id) if record is not None and state.is_finished() else None
    if lost is not None:  # the lease row decides a race with the reaper: claim_end
        raise Conflict(
            f"trial {trial_id} lost its lease ({lost.reason or lost.status}); its retry runs instead",
            code="update_finished_trial",
        )
    with optuna_errors():
        updated = rdb(db).set_trial_state_values(trial_id, state, values)
    if record is None:
        return study_id, updated, None, None
    following = None
    if updated and state == TrialState.RUNNING:
        trial = rdb(db).get_trial(trial_id)
        _lease(db, record, definition_of(record), trial, client_id, policy)
    elif state.is_finished():
        settle_study(db, record)
        if prefetch and updated and state in (TrialState.COMPLETE, TrialState.PRUNED):
            following = prefetch_trial(db, record, client_id=client_id, policy=policy)
    return study_id, updated, budget_left(db, record), following


def prefetch_trial(
    db: Database, record: StudyRecord, *, client_id: str | None, policy: LeasePolicy
) -> FrozenTrial | None:
    """Start a client's next running trial (no parameters yet), if the study hands one out now.

    None when the study is not open, has waiting trials (the client takes one of those), has used
    its budget or runs ``max_parallel`` trials.
    """
    with db.study_lock(record.id):
        record = reload(db, record)
        definition = definition_of(record)
        if record.state not in ("queued", "running"):
            return None
        counts = count_states(db, record)
        if counts[TrialState.WAITING] or used_count(counts) >= definition.budget.n_trials:
            return None
        max_parallel = definition.budget.max_parallel
        if max_parallel is not None and counts[TrialState.RUNNING] >= max_parallel:
            return None
        with optuna_errors():
            trial = rdb(db)._create_new_trial(record.optuna_study_id, None)
        _lease(db, record, definition, trial, client_id, policy)
    return trial


def release_trial(db: Database, trial_id: int) -> None:
    """Hand back a running trial the client will not run (a prefetched one, when its optimize loop
    ended): it is failed and re-queued as waiting without using a retry (caviar's hand-back)."""
    record = record_of(db, study_of_trial(db, trial_id))
    if record is None:
        raise OptunaKeyError(f"trial {trial_id} belongs to no caviar study")
    with optuna_errors():
        number = rdb(db).get_trial_number_from_id(trial_id)
    release(db, record.name, number, reason="handed back: its client's optimize loop ended")


def set_intermediate(db: Database, trial_id: int, step: int, value: float) -> None:
    with optuna_errors():
        rdb(db).set_trial_intermediate_value(trial_id, step, value)


def set_trial_attr(db: Database, trial_id: int, kind: str, key: str, value: Any) -> None:
    with optuna_errors():
        if kind == "user":
            rdb(db).set_trial_user_attr(trial_id, key, value)
        else:
            rdb(db).set_trial_system_attr(trial_id, key, value)


def heartbeat(db: Database, trial_ids: Sequence[int], policy: LeasePolicy) -> list[int]:
    """Renew the leases of running trials (one client's, in one call).

    Returns:
        The ids whose lease is gone: reaped (their retry runs instead), finished, or never leased.
    """
    return [trial_id for trial_id in trial_ids if not renew(db, trial_id, policy)]
