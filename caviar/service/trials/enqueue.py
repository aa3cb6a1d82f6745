"""Enqueue parameter sets over the API: waiting trials handed out before new samples, or complete
trials imported with their known result (Optuna's ``enqueue_trial`` and ``add_trial``).

Parameters come in decoded names (``beta1: 0.95``) and are checked against the search space by
:func:`~caviar.service.definition.check_params`, which also encodes them for Optuna.
"""

from __future__ import annotations

from collections.abc import Sequence

from optuna.trial import FrozenTrial

from caviar.service.db import Database
from caviar.service.definition import CheckedParams, StudyDefinition, check_finite, check_params
from caviar.service.errors import Conflict, InvalidInput
from caviar.service.store import (
    ENQUEUED,
    IMPORTED,
    STOPPED_STATES,
    add_trial,
    all_trials,
    count_states,
    definition_of,
    load_record,
    reload,
    settle_study,
    used_count,
)
from caviar.service.trials.leases import study_stopped
from caviar.service.trials.reads import to_read
from caviar.service.trials.schemas import EnqueueItem, TrialRead
from caviar.storage import StudyRecord

DEFAULT_CHUNK = 100
"""Trials written per hold of the study lock unless the caller says otherwise (``import_chunk_size``)."""


def enqueue(
    db: Database, name: str, items: Sequence[EnqueueItem], *, chunk_size: int = DEFAULT_CHUNK
) -> list[TrialRead]:
    """Add parameter sets to a study: waiting trials, or complete ones when a value is given.

    Every set is checked before any is added. They count against ``budget.n_trials`` like any
    trial; waiting ones are handed out by the next asks, before newly sampled trials. Imported
    results settle the study (its goal may be reached, its budget used).

    The sets are written ``chunk_size`` at a time, each chunk under one hold of the study lock
    (its budget check and its trials): whatever decides under that lock (an ask's budget, another
    import, the reaper, a stop) sees none or all of a chunk, and asks and heartbeats go on between
    chunks instead of waiting for the whole import. The first chunk checks the budget for all the
    sets; should asks take the room meanwhile, the chunk that no longer fits is refused (409
    ``budget_exhausted``, saying how many were added).

    Raises:
        InvalidInput: a set that does not fit the search space (the message names
            ``trials.<i>.params.<name>``), or values of the wrong number or not finite.
        Conflict: ``budget_exhausted`` when the sets would overshoot ``n_trials``;
            ``study_stopped``; ``study_failed``.
    """
    record = load_record(db, name)
    definition = definition_of(record)
    n_objectives = len(definition.study_directions)
    checked: list[tuple[CheckedParams, list[float] | None, dict[str, object]]] = []
    for index, item in enumerate(items):
        where = f"trials.{index}"
        params = check_params(definition.search_space, item.params, where=f"{where}.params")
        values = _values(item, where, n_objectives)
        attrs: dict[str, object] = {**(item.user_attrs or {}), (IMPORTED if values else ENQUEUED): True}
        checked.append((params, values, attrs))
    ids: list[int] = []
    for start in range(0, len(checked), max(1, chunk_size)):
        chunk = checked[start : start + max(1, chunk_size)]
        with db.study_lock(record.id):
            record, definition = _check_room(db, record, name, len(checked) - start, len(ids))
            ids += [
                add_trial(
                    db, record.optuna_study_id, definition.search_space, params, values=values, attrs=attrs
                )
                for params, values, attrs in chunk
            ]
            if any(values for _, values, _ in chunk):
                settle_study(db, record)
    return [to_read(definition, trial) for trial in _read_back(db, record, ids)]


BULK_READ_FROM = 50
"""From this many trials added, they are read back with the study's trials in one read (1,000 waiting
trials on PostgreSQL: one read instead of 1,000); fewer are read one by one (a study may hold many
waiting trials that one read would load for a few new ones)."""


def _read_back(db: Database, record: StudyRecord, ids: list[int]) -> list[FrozenTrial]:
    """The trials just added, in order."""
    if len(ids) < BULK_READ_FROM:
        return [db.optuna.get_trial(trial_id) for trial_id in ids]
    by_id = {t._trial_id: t for t in all_trials(db, record)}
    return [by_id.get(trial_id) or db.optuna.get_trial(trial_id) for trial_id in ids]


def _check_room(
    db: Database, record: StudyRecord, name: str, remaining: int, added: int
) -> tuple[StudyRecord, StudyDefinition]:
    """Under the study lock: the study takes trials and its budget has room for ``remaining`` more."""
    record = reload(db, record)
    definition = definition_of(record)
    so_far = f" ({added} added before this)" if added else ""
    if record.state in STOPPED_STATES:
        raise study_stopped(record)
    if record.state == "failed":
        raise Conflict(f"study {name!r} failed: too many failed trials{so_far}", code="study_failed")
    used = used_count(count_states(db, record))  # one aggregate: the history is never loaded here
    n_trials = definition.budget.n_trials
    if used + remaining > n_trials:
        raise Conflict(
            f"study {name!r} has used {used} of its {n_trials} trials; {remaining} more would "
            f"overshoot budget.n_trials (raise it with PATCH /api/v1/studies/{name}){so_far}",
            code="budget_exhausted",
        )
    return record, definition


def _values(item: EnqueueItem, where: str, n_objectives: int) -> list[float] | None:
    """The known result of an item to import, checked (None: a waiting trial)."""
    if item.value is not None and item.values is not None:
        raise InvalidInput(f"{where}.value: give value or values, not both")
    values = item.values if item.values is not None else ([item.value] if item.value is not None else None)
    if values is None:
        return None
    if len(values) != n_objectives:
        raise InvalidInput(
            f"{where}.values: the study has {n_objectives} objective(s), got {len(values)} value(s)",
            code="wrong_number_of_values",
        )
    try:
        check_finite(values)
    except ValueError as exc:
        raise InvalidInput(f"{where}.values: {exc}", code="non_finite_value") from None
    return values
