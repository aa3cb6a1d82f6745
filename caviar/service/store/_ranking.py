"""Complete trials ranked: best first by value, or front by front for several objectives."""

from __future__ import annotations

from collections.abc import Sequence

from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from caviar.service.definition import StudyDefinition


def best_first(
    definition: StudyDefinition, complete: Sequence[FrozenTrial], limit: int | None = None
) -> list[FrozenTrial]:
    """Complete trials, best first: by value, or front by front (Pareto rank) for several objectives.

    ``limit``: at least this many are ranked (the rest may be left out).
    """
    if not definition.multi_objective:
        return ranked(definition, complete)
    ordered: list[FrozenTrial] = []
    rest = list(complete)
    while rest and (limit is None or len(ordered) < limit):
        front = pareto_front(rest, definition.study_directions)
        ordered += front
        taken = {t.number for t in front}
        rest = [t for t in rest if t.number not in taken]
    return ordered


def ranked(definition: StudyDefinition, complete: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Complete single-objective trials, best first (ties: the earlier trial first)."""
    sign = -1.0 if definition.study_directions[0] == StudyDirection.MAXIMIZE else 1.0
    return sorted(complete, key=lambda t: (sign * t.values[0], t.number))


def pareto_front(trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection]) -> list[FrozenTrial]:
    """Non-dominated complete trials, ordered by number."""
    signs = [1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in directions]
    scored = [(t, [s * v for s, v in zip(signs, t.values, strict=True)]) for t in trials]

    def dominated(a: list[float]) -> bool:
        return any(all(x >= y for x, y in zip(b, a, strict=True)) and b != a for _, b in scored)

    return sorted((t for t, score in scored if not dominated(score)), key=lambda t: t.number)
