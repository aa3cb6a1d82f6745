"""One read of Optuna's storage where Optuna's own calls would make two.

A report asks the pruner with the history it has just read (the pruner would read it again), and an
ask samples a trial it has just created without reading it back (``optuna.Trial`` reads it).
Every read and write still goes through Optuna's storage API; what is saved is a second read of
the same thing within one call.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Container
from typing import Any, cast

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from caviar.service.db import Database
from caviar.service.store._tables import trials_by_id


class _OneRead:
    """Optuna's storage for one call: ``get_all_trials`` answered from one snapshot (when given), the
    first ``get_trial`` of a trial just created answered with it; everything else is the storage's."""

    def __init__(
        self,
        storage: BaseStorage,
        trials: list[FrozenTrial] | None = None,
        created: FrozenTrial | None = None,
    ) -> None:
        self._storage = storage
        self._trials = trials
        self._created = created

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        if self._trials is None:
            return self._storage.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        trials = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trial(self, trial_id: int) -> FrozenTrial:
        created, self._created = self._created, None  # answered once: the trial's first read
        if created is not None and created._trial_id == trial_id:
            return created
        return self._storage.get_trial(trial_id)


def _reads_history_at_rungs_only(pruner: optuna.pruners.BasePruner) -> bool:
    """A successive-halving pruner (``asha``, caviar's default) with its first rung known reads the
    study's trials only when the reported step is a rung's (with ``min_resource: auto`` it reads them
    at every report until a trial completes; Hyperband likewise until its brackets are set up)."""
    return (
        isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
        and getattr(pruner, "_min_resource", None) is not None
    )


def prune_reported(
    db: Database, study: optuna.Study, trial_id: int, reported: FrozenTrial | None = None
) -> bool:
    """Ask the study's pruner about a trial whose value was just reported, reading the history once.

    The trial itself comes from the same read (a running trial is always read afresh by Optuna's
    cache), so the pruner sees the value just stored. A successive-halving pruner with known rungs
    is given the reported trial alone and reads the history through the storage only at a rung:
    between rungs a report reads one trial, not every running one (py-spy, 2026-12-07: that read was
    56% of a report's CPU in a fused group of 8). ``reported``: the trial as read after its value
    was stored (:func:`reported_trials`), for such a pruner.
    """
    if _reads_history_at_rungs_only(study.pruner):
        return bool(study.pruner.prune(study, reported or db.optuna.get_trial(trial_id)))
    trials = db.optuna.get_all_trials(study._study_id, deepcopy=False)
    reported = next((t for t in trials if t._trial_id == trial_id), None)
    if reported is None:  # lint: defensive (another process's trial not in this snapshot)
        reported = db.optuna.get_trial(trial_id)
    study._storage = cast(BaseStorage, _OneRead(db.optuna, trials))
    return bool(study.pruner.prune(study, reported))


def reported_trials(db: Database, study: optuna.Study, trial_ids: Collection[int]) -> dict[int, FrozenTrial]:
    """The trials a batch of reports has just written values to, in one read, when the study's pruner
    judges a report by its trial alone between rungs (successive halving; :func:`prune_reported`);
    else none (that pruner reads the history for each report anyway)."""
    if not _reads_history_at_rungs_only(study.pruner):
        return {}
    return trials_by_id(db, study._study_id, trial_ids)


def started_trial(study: optuna.Study, created: FrozenTrial) -> optuna.Trial:
    """An ``optuna.Trial`` for a trial this call has just created, without reading it back.

    ``optuna.Trial`` reads its trial first; a trial created a moment ago from a template is that
    template with its number and id (Optuna stores the template as it is), and no one else knows
    of it yet. Every later read and write goes to the storage.
    """
    recorder = _OneRead(study._storage, created=copy.deepcopy(created))
    study._storage = cast(BaseStorage, recorder)
    return optuna.Trial(study, created._trial_id)
