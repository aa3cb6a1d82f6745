"""How many torch threads each CPU slot of a worker gets."""

from __future__ import annotations

import os

import pytest

from caviar.worker._supervisor import slot_threads


@pytest.fixture
def cores(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    return 8


def test_the_cores_are_shared_out_among_cpu_slots(cores: int) -> None:
    assert slot_threads(1, {}) == cores
    assert slot_threads(2, {}) == cores // 2
    assert slot_threads(3, {}) == 2
    assert slot_threads(16, {}) == 1  # never fewer than one
    assert slot_threads(0, {}) == cores  # GPU slots only: the share is not divided by zero


def test_omp_num_threads_caps_each_slot(cores: int) -> None:
    assert slot_threads(1, {"OMP_NUM_THREADS": "1"}) == 1
    assert slot_threads(2, {"OMP_NUM_THREADS": "3"}) == 3
    assert slot_threads(2, {"OMP_NUM_THREADS": "16"}) == 4  # a cap, never more than the share


@pytest.mark.parametrize("value", ["", "0", "-2", "four", " "])
def test_an_unusable_omp_num_threads_is_ignored(cores: int, value: str) -> None:
    assert slot_threads(2, {"OMP_NUM_THREADS": value}) == 4
