"""Test helpers shared by the service tests."""

from __future__ import annotations

from typing import Any

from caviar.service.store import LeasePolicy

POLICY = LeasePolicy(heartbeat_interval_s=30.0)
"""The lease policy of tests that call the trial domain directly (the service's default interval)."""


def external_study(name: str = "s", *, n_trials: int = 10, **budget: Any) -> dict[str, Any]:
    """A small external-objective definition (lr log, beta1 reverse_log, dropout linear)."""
    return {
        "name": name,
        "direction": "maximize",
        "search_space": {
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "scale": "log"},
            "beta1": {"type": "float", "low": 0.8, "high": 0.999, "scale": "reverse_log"},
            "dropout": {"type": "float", "low": 0.0, "high": 0.6},
        },
        "objective": {"kind": "external"},
        "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "none"},
        "budget": {"n_trials": n_trials, **budget},
    }
