"""The Pareto front of a multi-objective study, on plain trials (no database involved)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from optuna.study import StudyDirection

from caviar.service import store

MAX, MIN = StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE


def trial(number: int, *values: float) -> Any:
    return SimpleNamespace(number=number, values=list(values))


def test_a_trial_that_ties_on_one_objective_and_loses_on_another_is_dominated() -> None:
    tied, better = trial(0, 1.0, 1.0), trial(1, 1.0, 2.0)
    assert store.pareto_front([tied, better], [MAX, MAX]) == [better]
    # minimising: lower is better, a tie on the first objective still leaves the worse one out
    low, high = trial(2, 1.0, 0.5), trial(3, 1.0, 0.7)
    assert store.pareto_front([high, low], [MIN, MIN]) == [low]


def test_the_front_keeps_trade_offs_and_equal_points_in_trial_order() -> None:
    a, b, c, same = trial(3, 1.0, 3.0), trial(1, 3.0, 1.0), trial(2, 2.0, 2.0), trial(0, 2.0, 2.0)
    assert [t.number for t in store.pareto_front([a, b, c, same], [MAX, MAX])] == [0, 1, 2, 3]
    dominated = trial(4, 0.5, 0.5)
    assert store.pareto_front([dominated, a], [MAX, MAX]) == [a]
    # mixed directions: maximise the first, minimise the second
    front = store.pareto_front([trial(6, 2.0, 3.0), trial(5, 2.0, 1.0)], [MAX, MIN])
    assert [t.number for t in front] == [5]
