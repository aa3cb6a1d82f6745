"""The in-group rung decision of the ``asha`` pruner (caviar.worker._asha), on tiny synthetic curves."""

from __future__ import annotations

import math

import pytest

from caviar.worker._asha import Rungs, cohort_cut, decide_epoch

ETA3 = Rungs(min_resource=1, reduction_factor=3)


def test_rungs_are_geometric_steps() -> None:
    assert [s for s in range(30) if ETA3.is_rung(s)] == [1, 3, 9, 27]
    rungs = Rungs(min_resource=2, reduction_factor=2, min_early_stopping_rate=1)
    assert [s for s in range(20) if rungs.is_rung(s)] == [4, 8, 16]


def test_rungs_of_a_definition() -> None:
    asha = {
        "type": "asha",
        "options": {"min_resource": 2, "reduction_factor": 4, "min_early_stopping_rate": 0},
    }
    assert Rungs.of({"direction": "minimize", "pruner": asha}) == Rungs(2, 4, 0, maximize=False)
    assert Rungs.of({"direction": "maximize", "pruner": {"type": "asha"}}) == Rungs(maximize=True)
    assert Rungs.of({"direction": "maximize", "pruner": {"type": "median"}}) is None
    assert Rungs.of({"directions": ["maximize", "minimize"], "pruner": asha}) is None


def test_a_cohort_keeps_its_top_third() -> None:
    values = {0: 0.5, 1: 0.9, 2: 0.1, 3: 0.7, 4: 0.3, 5: 0.8, 6: 0.2, 7: 0.6}
    assert cohort_cut(values, ETA3) == {0, 2, 3, 4, 6, 7}  # 8 // 3 = 2 go on: 0.9 and 0.8
    assert cohort_cut(values, Rungs(reduction_factor=3, maximize=False)) == {0, 1, 3, 4, 5, 7}  # 0.1, 0.2


def test_a_cohort_smaller_than_eta_is_left_to_the_service() -> None:
    assert cohort_cut({0: 0.1, 1: 0.9}, ETA3) == set()
    assert cohort_cut({0: 0.1, 1: 0.9, 2: 0.5}, ETA3) == {0, 2}


def test_ties_with_the_last_kept_go_on_and_nan_is_the_worst() -> None:
    assert cohort_cut({0: 0.5, 1: 0.5, 2: 0.5}, ETA3) == set()
    assert cohort_cut({0: math.nan, 1: 0.1, 2: 0.2}, ETA3) == {0, 1}
    assert cohort_cut({0: math.nan, 1: 0.1, 2: 0.2}, Rungs(maximize=False)) == {0, 2}


def test_decide_epoch_reports_everyone_cohorts_worst_first_and_joins_both_decisions() -> None:
    # members 0-5 at rung step 1; 6 and 7 joined later (steps 0 and 2: no rung)
    entries = [(0, 1, 0.4), (1, 1, 0.9), (2, 1, 0.1), (3, 1, 0.6), (4, 1, 0.8), (5, 1, 0.2)]
    entries += [(6, 0, 0.3), (7, 2, 0.5)]
    batches: list[list[tuple[int, int, float]]] = []

    def service(batch: list[tuple[int, int, float]]) -> set[int]:
        batches.append(batch)
        return {7, 4} & {
            m for m, _, _ in batch
        }  # the study's rung values say 0.8 is not good enough; 7 is stopping

    stop = decide_epoch(entries, ETA3, service)
    assert len(batches) == 1  # one call (one request) for the whole epoch
    calls = batches[0]
    assert sorted(calls) == sorted(entries)  # every value reaches the service
    assert [m for m, _, _ in calls[:2]] == [6, 7]  # between rungs first
    assert [m for m, step, _ in calls if step == 1] == [2, 5, 0, 3, 4, 1]  # the cohort, worst first
    assert stop == {0, 2, 3, 5} | {4} | {7}  # the cut (top 2 of 6 go on) + the service's answers


@pytest.mark.parametrize("steps", [[0] * 8, [2] * 8])
def test_between_rungs_only_the_service_decides(steps: list[int]) -> None:
    entries = [(m, s, m / 10) for m, s in enumerate(steps)]
    assert decide_epoch(entries, ETA3, lambda batch: {m for m, _, _ in batch if m == 3}) == {3}


def test_a_group_of_eight_runs_about_eta_times_fewer_epochs_per_rung() -> None:
    """Synthetic curves: member m's value at step s is m + s / 100 (higher members are better).
    Training a group of 8 to step 9 with no refills and a lenient service: 2 go on past rung 1."""
    live = set(range(8))
    epochs = 0
    for step in range(10):
        entries = [(m, step, m + step / 100) for m in sorted(live)]
        epochs += len(entries)
        live -= decide_epoch(entries, ETA3, lambda batch: set())
    assert live == {6, 7}  # step 1: 8 // 3 go on; steps 3 and 9: 2 < eta, left to the service
    assert epochs == 8 * 2 + 2 * 8
