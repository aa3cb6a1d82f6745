"""The names the store speaks: study states, THE trial-state map, caviar's trial attributes.

Every other module reads these names from here (``caviar.service.store``); none spells them again.
"""

from __future__ import annotations

from optuna.trial import TrialState

# ---- study states -------------------------------------------------------------------------------

QUEUE_STATES = ("queued", "running")
"""States in which a study hands out trials."""
ACTIVE_STATES = ("queued", "running", "paused")
"""States a study can be stopped, or reach its goal or deadline, in."""
STOPPED_STATES = ("stopping", "stopped")
"""A stop was asked for (by a person, the goal or the deadline): no new trials, running ones end."""
FINAL_STATES = ("completed", "failed", "stopped")
"""States a study stays in unless a person changes its budget (completed, failed)."""

# ---- trial states -------------------------------------------------------------------------------

STATE_NAMES: dict[TrialState, str] = {
    TrialState.WAITING: "waiting",
    TrialState.RUNNING: "running",
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "fail",
}
"""THE map from Optuna's trial states to the names the API, the counts and the filters use."""
FINISHED_BY_NAME: dict[str, TrialState] = {
    name: state for state, name in STATE_NAMES.items() if state.is_finished()
}
"""The states a tell may finish a trial in, by name (``complete``, ``pruned``, ``fail``)."""


def states_named(name: str) -> list[TrialState]:
    """The Optuna states behind an API state name (empty for an unknown name)."""
    return [state for state, known in STATE_NAMES.items() if known == name]


# ---- attributes ---------------------------------------------------------------------------------

# caviar's own trial attributes live under the ``caviar:`` prefix
RETRY_OF = "caviar:retry_of"
ATTEMPT = "caviar:attempt"
FAIL_REASON = "caviar:fail_reason"
RELEASED = "caviar:released"
WORKER = "caviar:worker_id"
ASKED = "caviar:asked"
READY = "caviar:ready"  # system attr: the ask that made this trial finished sampling
CANCELLED = "caviar:cancelled"  # a waiting trial failed because its study stopped
ENQUEUED = "caviar:enqueued"  # a parameter set enqueued over the API
IMPORTED = "caviar:imported"  # a complete trial imported with its known value(s)
WARM_START_FROM = "caviar:warm_start_from"
"""Trial attribute of a warm-start trial: ``<source study>#<trial number>``."""
METRIC_NAMES_ATTR = "study:metric_names"
"""Optuna's study system attribute for metric names (what ``Study.set_metric_names`` writes): the
dashboard labels its charts with them."""
