"""THE budget rule: which trials use ``budget.n_trials``, and when it is spent.

``n_trials`` counts complete, pruned, running and waiting trials, whoever created them; failed
trials do not use it (their retries do, once waiting). A study whose complete and pruned trials
reach ``n_trials`` has spent its budget: it completes once nothing runs or waits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from optuna.trial import FrozenTrial, TrialState

from caviar.service.store._states import CANCELLED, RELEASED

USING_BUDGET = frozenset({TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING})
"""The trial states that use the budget."""
DONE = frozenset({TrialState.COMPLETE, TrialState.PRUNED})
"""The trial states that spend it for good (a running trial may still fail and be retried)."""


def state_counts(trials: Sequence[FrozenTrial]) -> dict[TrialState, int]:
    """How many of ``trials`` are in each state (every state present, zero or more)."""
    counts = dict.fromkeys(TrialState, 0)
    for trial in trials:
        counts[trial.state] += 1
    return counts


def used_count(counts: Mapping[TrialState, int]) -> int:
    """Trials that use the budget: complete, pruned, running and waiting ones."""
    return sum(counts.get(state, 0) for state in USING_BUDGET)


def done_count(counts: Mapping[TrialState, int]) -> int:
    """Trials that spent the budget for good: complete and pruned ones."""
    return sum(counts.get(state, 0) for state in DONE)


def budget_spent(counts: Mapping[TrialState, int], n_trials: int) -> bool:
    """Whether the finished trials have used up ``n_trials`` (the study is done once none runs or waits)."""
    return done_count(counts) >= n_trials


def fail_count(trials: Sequence[FrozenTrial]) -> int:
    """Failed trials that count against ``max_failed_trials`` (hand-backs and cancelled trials do not)."""
    return sum(
        1
        for t in trials
        if t.state == TrialState.FAIL and not t.user_attrs.get(RELEASED) and not t.user_attrs.get(CANCELLED)
    )
