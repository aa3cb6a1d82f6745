"""Sampler and pruner factories; options are checked against the real Optuna constructors.

Optuna persists neither samplers nor pruners, so caviar rebuilds them from the stored study
definition whenever it needs one.
"""

from __future__ import annotations

import collections.abc
import copy
import functools
import inspect
import json
import math
import sys
import typing
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.samplers._lazy_random_state import LazyRandomState
from pydantic import TypeAdapter, ValidationError

SAMPLERS: dict[str, Callable[..., BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "qmc": optuna.samplers.QMCSampler,
    "gp": optuna.samplers.GPSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "grid": optuna.samplers.GridSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
}

ASHA_DEFAULTS = {"min_resource": 1, "reduction_factor": 3, "min_early_stopping_rate": 0}
"""The rungs of the default pruner ``asha`` (epochs 1, 3, 9, ... as 0-based steps; the top third goes on)."""


def asha_pruner(
    min_resource: int = 1, reduction_factor: int = 3, min_early_stopping_rate: int = 0
) -> BasePruner:
    """The ``asha`` pruner, caviar's default: asynchronous successive halving.

    Service-side it is Optuna's ``SuccessiveHalvingPruner`` (rung bookkeeping across every trial of
    the study: a trial reaching rung ``k`` at step ``min_resource * reduction_factor **
    (min_early_stopping_rate + k)`` goes on only in the top ``1 / reduction_factor`` of the values
    recorded at that rung so far). Workers training fused groups also rank each group's members that
    reach a rung together (a cohort), so the first groups are pruned before any trial has finished.
    """
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=min_resource,
        reduction_factor=reduction_factor,
        min_early_stopping_rate=min_early_stopping_rate,
    )


PRUNERS: dict[str, Callable[..., BasePruner]] = {
    "asha": asha_pruner,
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "patient": optuna.pruners.PatientPruner,
    "wilcoxon": optuna.pruners.WilcoxonPruner,
}

# Constructor arguments that take Python objects (callables, samplers) cannot come from JSON;
# the seed and grid search space come from the definition itself.
_NOT_OPTIONS = {
    "seed",
    "search_space",
    "constraints_func",
    "independent_sampler",
    "weights",
    "gamma",
    "mutation",
    "crossover",
    "elite_population_selection_strategy",
    "child_generation_strategy",
    "after_trial_strategy",
    "source_trials",
    "wrapped_pruner",
}

_SEED_STRIDE = 7919  # a prime: trial n of a study with seed s samples with seed s + n * stride


def allowed_options(factory: Callable[..., Any]) -> list[str]:
    """The JSON-settable keyword arguments of a sampler or pruner constructor."""
    return [name for name in inspect.signature(factory).parameters if name not in _NOT_OPTIONS]


@functools.cache
def _option_types(factory: Callable[..., Any]) -> dict[str, TypeAdapter[Any]]:
    """Type adapters for the options whose annotations resolve (Optuna annotates lazily)."""
    namespace: dict[str, Any] = {**vars(typing), **vars(collections.abc)}
    namespace.update(vars(sys.modules[factory.__module__]))
    adapters: dict[str, TypeAdapter[Any]] = {}
    parameters = inspect.signature(factory).parameters
    for name in allowed_options(factory):
        annotation = parameters[name].annotation
        try:
            resolved = eval(annotation, namespace) if isinstance(annotation, str) else annotation
            adapters[name] = TypeAdapter(resolved)
        except Exception:  # an annotation we cannot check: the constructor still checks it
            continue
    return adapters


OPTION_CAPS: dict[str, int] = {
    "n_ei_candidates": 1_000,  # TPE's candidates per suggestion: the cost of every ask
    "population_size": 10_000,
    "popsize": 10_000,
    "n_startup_trials": 100_000,
}
"""Upper bounds of the options whose size is the cost of every ask (others: at most 10**6)."""
MAX_INT_OPTION = 1_000_000
MAX_ABS_FLOAT_OPTION = 1e12


def check_options(factory: Callable[..., Any], options: dict[str, Any]) -> None:
    """Raise ValueError naming the first unknown, mistyped or out-of-bounds option.

    Numbers are bounded (:data:`OPTION_CAPS`, else ``|int| <= 10**6``, finite ``|float| <= 1e12``)
    so that no option can make each ask take seconds or gigabytes.
    """
    allowed = allowed_options(factory)
    adapters = _option_types(factory)
    for key, value in options.items():
        if key not in allowed:
            raise ValueError(f"unknown option {key!r}; allowed: {', '.join(allowed) or 'none'}")
        if key in adapters:
            try:
                adapters[key].validate_python(value)
            except ValidationError as exc:
                raise ValueError(f"option {key!r}: {exc.errors()[0]['msg']}") from None
        _check_bounded(key, value)


def _check_bounded(key: str, value: Any) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        cap = OPTION_CAPS.get(key, MAX_INT_OPTION)
        if abs(value) > cap:
            raise ValueError(f"option {key!r}: at most {cap} (got {value})")
    elif isinstance(value, float):
        if not math.isfinite(value) or abs(value) > MAX_ABS_FLOAT_OPTION:
            raise ValueError(f"option {key!r}: a finite number within +/-{MAX_ABS_FLOAT_OPTION:g}")
    elif isinstance(value, list | tuple):
        if len(value) > 1000:
            raise ValueError(f"option {key!r}: at most 1000 items")
        for item in value:
            _check_bounded(key, item)
    elif isinstance(value, dict):
        if len(value) > 100:
            raise ValueError(f"option {key!r}: at most 100 entries")
        for item in value.values():
            _check_bounded(key, item)


def trial_seed(seed: int | None, trial_number: int) -> int | None:
    """Per-trial sampler seed: sequential runs repeat exactly, parallel processes never collide."""
    if seed is None:
        return None
    return (seed + trial_number * _SEED_STRIDE) % (2**32)


def build_sampler(
    kind: str,
    options: dict[str, Any],
    seed: int | None,
    *,
    grid: dict[str, list[Any]] | None = None,
    trial_number: int = 0,
) -> BaseSampler:
    """A sampler of ``kind`` seeded for ``trial_number`` (QMC keeps the study seed: it indexes by trial)."""
    if kind == "grid":
        return grid_sampler(grid or {}, seed, trial_number)
    factory = SAMPLERS[kind]
    kwargs = dict(options)
    kwargs["seed"] = seed if kind == "qmc" else trial_seed(seed, trial_number)
    if kind == "qmc":
        kwargs.setdefault("warn_asynchronous_seeding", False)
    return factory(**kwargs)


def grid_sampler(grid: dict[str, list[Any]], seed: int | None, trial_number: int) -> BaseSampler:
    """Optuna's grid sampler: the grid shuffled once with the study's seed, the pick per trial.

    Optuna identifies a visited point by its index in the shuffled grid, so every process must
    shuffle the same way (the study seed); only the choice among unvisited points takes the
    trial's seed, so concurrent asks rarely pick the same point. The grid (up to
    ``MAX_GRID_POINTS`` tuples) is built once per process, not per ask.
    """
    sampler = copy.copy(_shuffled_grid(json.dumps(grid, sort_keys=True), seed))
    sampler._rng = LazyRandomState(trial_seed(seed, trial_number) or trial_number)
    return sampler


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus ``study.stop()`` once the grid is covered: that works only inside
    ``study.optimize`` (elsewhere it raises), and a caviar study ends by its budget."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


@functools.lru_cache(maxsize=64)
def _shuffled_grid(grid_json: str, seed: int | None) -> optuna.samplers.GridSampler:
    return _GridSampler(json.loads(grid_json), seed=seed)


def build_pruner(kind: str, options: dict[str, Any], *, max_resource: int | None = None) -> BasePruner:
    """A pruner of ``kind``; ``patient`` wraps another pruner given as ``options.wrapped`` (or none:
    then it prunes a trial whose reports stopped improving for ``patience`` steps)."""
    if kind == "pbt":  # population-based training runs in the worker's fused groups: no pruning here
        return optuna.pruners.NopPruner()
    kwargs = dict(options)
    if kind == "patient":
        # Without ``wrapped`` it is Optuna's PatientPruner(None, patience): it prunes on stagnation.
        wrapped = kwargs.pop("wrapped", None)
        if wrapped is not None and (
            not isinstance(wrapped, dict)
            or wrapped.get("type") not in PRUNERS
            or wrapped["type"] == "patient"
        ):
            raise ValueError("options.wrapped must be {type: <pruner other than patient>, options: {...}}")
        kwargs["wrapped_pruner"] = (
            None
            if wrapped is None
            else build_pruner(wrapped["type"], dict(wrapped.get("options") or {}), max_resource=max_resource)
        )
    if kind == "hyperband" and max_resource is not None:
        kwargs.setdefault("max_resource", max_resource)
    return PRUNERS[kind](**kwargs)


def grid_values(low: float, high: float, step: float) -> list[Any]:
    """The points of a stepped numeric range."""
    count = int(np.floor((high - low) / step + 1e-9)) + 1
    return [low + i * step for i in range(count)]
