"""Shared fixtures for the trainer tests."""

from __future__ import annotations

import pytest
import torch

from caviar.trainer import Dataset, load_dataset


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    # One thread: `make test` runs two test processes on CI's two cores, and two threads each
    # (measured under load: a fused-equivalence test took 7x as long and 3x the CPU time) only
    # spin against each other. The results do not depend on it.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits", validation_split=0.2, seed=0)


@pytest.fixture(scope="session")
def small_tabular() -> Dataset:
    return load_dataset("synthetic", n_samples=600, n_features=12, n_classes=3, n_informative=8, seed=1)
