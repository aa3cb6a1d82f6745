"""Creating a study (caviar's row and the Optuna study of the same name, all or nothing, with its
warm start) and adding trials to it as Optuna's ``enqueue_trial``/``add_trial`` do."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState, create_trial
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from caviar.service.db import Database
from caviar.service.definition import (
    CheckedParams,
    StudyDefinition,
    StudyTemplate,
    check_params,
    decode_params,
)
from caviar.service.errors import Conflict, InvalidInput
from caviar.service.store._ranking import best_first
from caviar.service.store._records import all_trials, definition_of
from caviar.service.store._states import METRIC_NAMES_ATTR, WARM_START_FROM
from caviar.storage import StudyRecord


def check_data_access(definition: StudyTemplate, *, data_files: bool) -> None:
    """Refuse a ``file:`` dataset where the caller may not name files.

    Over REST a study may read a ``file:`` dataset only when the service has a data root
    (``CAVIAR_DATA_DIR``): whoever can create a study must not be able to make workers read files
    outside the directory their operator set aside for data.

    Raises:
        InvalidInput: ``file_datasets_disabled``.
    """
    if definition.uses_data_file and not data_files:
        raise InvalidInput(
            "objective.dataset: file: datasets are disabled on this service (CAVIAR_DATA_DIR is unset)",
            code="file_datasets_disabled",
            details=[{"field": "objective.dataset", "message": "file: datasets are disabled"}],
        )


def create_study(
    db: Database, definition: StudyDefinition, *, schedule_id: int | None = None, data_files: bool = True
) -> StudyRecord:
    """Create the caviar study and the Optuna study of the same name.

    Args:
        db: the database.
        definition: the validated definition.
        schedule_id: the schedule that created it, if any.
        data_files: whether the caller may use ``file:`` datasets (see :func:`check_data_access`).

    A definition with ``warm_start`` starts with the best complete trials of that study enqueued
    (see :func:`_warm_start`).

    Raises:
        Conflict: ``name_taken`` when a caviar or Optuna study already has the name.
        InvalidInput: ``file_datasets_disabled``; ``unknown_study`` for a warm start from a study
            that does not exist.
    """
    check_data_access(definition, data_files=data_files)
    name = definition.name
    with db.session() as session:
        if session.scalar(select(StudyRecord.id).where(StudyRecord.name == name)) is not None:
            raise Conflict(f"a study named {name!r} already exists", code="name_taken")
    source = _warm_start_source(db, definition)
    try:
        study_id = db.optuna.create_new_study(definition.study_directions, name)
    except optuna.exceptions.DuplicatedStudyError:
        raise Conflict(f"a study named {name!r} already exists", code="name_taken") from None
    # All or nothing: whatever fails from here on (a value the database refuses, an outage), the
    # Optuna study goes too, so the name is never left blocked by a half-created study.
    try:
        db.optuna.set_study_user_attr(study_id, "caviar:metrics", definition.metrics)
        db.optuna.set_study_system_attr(study_id, METRIC_NAMES_ATTR, definition.metrics)
        db.optuna.set_study_user_attr(study_id, "caviar:sampler", definition.sampler_description())
        # The warm-start trials are enqueued before the caviar study exists, so no ask can come first.
        warm_start = _warm_start(db, study_id, definition, source) if source is not None else None
        record = StudyRecord(
            name=name,
            state="queued",
            definition=definition.model_dump(mode="json"),
            priority=definition.priority,
            objective_kind=definition.objective.kind,
            optuna_study_id=study_id,
            schedule_id=schedule_id,
            warm_start=warm_start,
        )
        with db.session() as session, session.begin():
            session.add(record)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            db.optuna.delete_study(study_id)
        if isinstance(exc, IntegrityError):
            raise Conflict(f"a study named {name!r} already exists", code="name_taken") from None
        raise
    return record


def _warm_start_source(db: Database, definition: StudyDefinition) -> StudyRecord | None:
    if definition.warm_start is None:
        return None
    source = definition.warm_start.source
    with db.session() as session:
        record = session.scalar(select(StudyRecord).where(StudyRecord.name == source))
    if record is None:
        raise InvalidInput(
            f"warm_start.from: no study named {source!r}",
            code="unknown_study",
            details=[{"field": "warm_start.from", "message": f"no study named {source!r}"}],
        )
    return record


_MAX_REASONS = 10


def _warm_start(
    db: Database, study_id: int, definition: StudyDefinition, source: StudyRecord
) -> dict[str, Any]:
    """Enqueue the ``top_k`` best complete trials of ``source`` that fit this study's space.

    Each trial's decoded parameters are kept to this space's names and checked with
    :func:`~caviar.service.definition.check_params`; a trial that does not fit (a value out of the
    narrowed range, a parameter this space needs and the source lacks), repeats parameters
    already enqueued, or would overshoot ``n_trials`` is skipped and counted.

    Returns:
        ``{from, enqueued, skipped, reasons}`` (at most ten reasons, one per skipped trial).
    """
    assert definition.warm_start is not None
    source_definition = definition_of(source)
    complete = [t for t in all_trials(db, source, [TrialState.COMPLETE]) if t.values is not None]
    space = definition.search_space
    seen: set[tuple[tuple[str, Any], ...]] = set()
    enqueued, reasons = 0, []
    top_k = definition.warm_start.top_k
    top = best_first(source_definition, complete, limit=top_k)[:top_k]
    for trial in top:
        decoded = decode_params(source_definition.search_space, trial.params)
        try:
            checked = check_params(space, {k: v for k, v in decoded.items() if k in space})
        except InvalidInput as exc:
            reasons.append({"number": trial.number, "reason": exc.message})
            continue
        key = tuple(sorted(checked.stored.items(), key=lambda item: item[0]))
        if key in seen:
            reasons.append({"number": trial.number, "reason": "same parameters as a better trial"})
            continue
        if enqueued >= definition.budget.n_trials:
            reasons.append({"number": trial.number, "reason": "budget.n_trials reached"})
            continue
        seen.add(key)
        add_trial(db, study_id, space, checked, attrs={WARM_START_FROM: f"{source.name}#{trial.number}"})
        enqueued += 1
    return {
        "from": source.name,
        "enqueued": enqueued,
        "skipped": len(reasons),
        "reasons": reasons[:_MAX_REASONS],
    }


def add_trial(
    db: Database,
    study_id: int,
    space: Mapping[str, Any],
    checked: CheckedParams,
    *,
    values: Sequence[float] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> int:
    """Add a trial with checked parameters to an Optuna study, as Optuna's ``add_trial`` does.

    Without ``values`` it is a waiting trial (Optuna's ``enqueue_trial``: the parameters are its
    ``fixed_params``; the next ask hands it out); with them a complete trial the sampler learns from.
    Either way the decoded reversed parameters are user attributes, so the dashboard shows them.

    Returns:
        The new trial's id.
    """
    user_attrs = {**checked.decoded_attrs(space), **(attrs or {})}
    if values is None:
        template = create_trial(
            state=TrialState.WAITING, system_attrs={"fixed_params": checked.stored}, user_attrs=user_attrs
        )
    else:
        template = create_trial(
            state=TrialState.COMPLETE,
            values=list(values),
            params=checked.stored,
            distributions=checked.distributions,
            user_attrs=user_attrs,
        )
    return db.optuna.create_new_trial(study_id, template_trial=template)
