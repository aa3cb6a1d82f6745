"""Asynchronous successive halving inside a fused group (the ``asha`` pruner, caviar's default).

The service runs Optuna's ``SuccessiveHalvingPruner`` for every report: it records each trial's value
at each rung and keeps a trial going only in the top ``1 / eta`` of the values recorded at that rung
so far, across the whole study. A fused group adds what a trial-by-trial pruner cannot see: its
members that reach a rung at the same epoch are a cohort, trained side by side, so they can be
ranked against each other at once, before any trial of the study has finished. At a rung:

* the bottom ``1 - 1/eta`` of the cohort stop (the top ``n // eta`` go on; ties with the last one
  kept go on too); a cohort smaller than ``eta`` has too few results to cut and is left to the
  service;
* every member is still reported, worst first, so the service records its value at the rung (later
  trials are ranked against it) and prunes a member that is not in the top ``1 / eta`` of the
  study's values at that rung together with the worse members of its cohort (reporting worst first
  keeps a member's better peers, judged by the cut above, from counting against it twice).

A member stops when either says so; its place in the group is refilled with a new trial at once
(``refill`` of :func:`caviar.trainer.train_group`). Between rungs reports go through the service as
they are (the study may be stopping, a lease may be lost). An epoch's reports travel as one batch
(``POST .../trials/reports``), recorded in the order given here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Rungs", "cohort_cut", "decide_epoch"]

Entry = tuple[int, int, float]
"""``(member, step, value)``: one live member's report after an epoch."""


@dataclass(frozen=True)
class Rungs:
    """Where the rungs are: steps ``min_resource * reduction_factor ** (min_early_stopping_rate + k)``
    (Optuna's SuccessiveHalvingPruner's), and how many of a rung go on (the top ``1 / reduction_factor``).
    """

    min_resource: int = 1
    reduction_factor: int = 3
    min_early_stopping_rate: int = 0
    maximize: bool = True

    @classmethod
    def of(cls, definition: dict[str, Any]) -> Rungs | None:
        """The rungs of a single-objective study whose pruner is ``asha`` (else None: the service's
        pruner decides every report alone)."""
        pruner = definition.get("pruner") or {}
        if pruner.get("type") != "asha":
            return None
        directions = definition.get("directions") or [definition.get("direction") or "minimize"]
        if len(directions) != 1:
            return None
        options = pruner.get("options") or {}
        return cls(
            min_resource=int(options.get("min_resource", 1)),
            reduction_factor=int(options.get("reduction_factor", 3)),
            min_early_stopping_rate=int(options.get("min_early_stopping_rate", 0)),
            maximize=directions[0] == "maximize",
        )

    def is_rung(self, step: int) -> bool:
        """Whether ``step`` is a rung's promotion step."""
        rung_step = self.min_resource * self.reduction_factor**self.min_early_stopping_rate
        while rung_step <= step:
            if rung_step == step:
                return True
            rung_step *= self.reduction_factor
        return False

    def rank_key(self, value: float) -> float:
        """Larger is better; a non-finite value is the worst."""
        if math.isnan(value):
            return -math.inf
        return value if self.maximize else -value


def cohort_cut(values: dict[int, float], rungs: Rungs) -> set[int]:
    """The members of one cohort (all at the same rung) that stop: all but the top ``n // eta``.

    Args:
        values: ``{member: value at the rung}``.
        rungs: the study's rungs (``reduction_factor`` and direction).

    Returns:
        The members to stop; none when the cohort has fewer than ``reduction_factor`` members.
    """
    n = len(values)
    if n < rungs.reduction_factor:
        return set()
    ranked = sorted((rungs.rank_key(v) for v in values.values()), reverse=True)
    cutoff = ranked[n // rungs.reduction_factor - 1]
    return {member for member, value in values.items() if rungs.rank_key(value) < cutoff}


def decide_epoch(
    entries: Sequence[Entry], rungs: Rungs, report: Callable[[list[Entry]], set[int]]
) -> set[int]:
    """The members to stop after one epoch of a fused group.

    Args:
        entries: every live member's ``(member, step, value)`` (members that joined later are at
            earlier steps: each step is its own cohort).
        rungs: the study's rungs.
        report: ``report(entries) -> the members the service stops``; called once with every entry,
            those between rungs first, then each cohort worst first (the service records them in
            this order: one batch of reports).

    Returns:
        The members to stop (the service's decisions and the in-group cuts).
    """
    stop: set[int] = set()
    ordered: list[Entry] = []
    cohorts: dict[int, dict[int, float]] = {}
    for member, step, value in entries:
        if rungs.is_rung(step):
            cohorts.setdefault(step, {})[member] = value
        else:
            ordered.append((member, step, value))
    for step, values in cohorts.items():
        stop |= cohort_cut(values, rungs)
        worst_first = sorted(values, key=lambda m: rungs.rank_key(values[m]))
        ordered += [(member, step, values[member]) for member in worst_first]
    return stop | report(ordered)
