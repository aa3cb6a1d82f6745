"""Smoke test of benchmarks/pbt_vs_asha.py: both arms spend the same member-epoch budget."""

from __future__ import annotations

import pytest

from benchmarks import pbt_vs_asha
from caviar.trainer import load_dataset


@pytest.mark.slow
def test_both_arms_spend_the_same_epoch_budget() -> None:
    data = load_dataset("synthetic", n_samples=400, n_features=8, n_classes=3, n_informative=6, seed=0)
    pbt = pbt_vs_asha.run_pbt(data, seed=0, population=4, max_epochs=3, interval=1)
    asha = pbt_vs_asha.run_asha(data, seed=0, population=4, max_epochs=3, budget=12)
    assert pbt["epochs"] == asha["epochs"] == 12
    assert pbt["trials"] == 4 and asha["trials"] >= 4
    assert 0 <= pbt["best_val_accuracy"] <= 1
    assert asha["best_val_accuracy"] is None or 0 <= asha["best_val_accuracy"] <= 1
