"""``sampler: {type: auto}``: Optuna's sampler chosen from the study's shape, and a Sobol warm-up.

The choice is a pure function of the stored definition (:func:`choose` over a :class:`Shape`), so
every server process builds the same sampler for the same trial; each stage is seeded per trial as
any other sampler. A choice is a list of stages, each from a trial number on:

* a warm-up of scrambled Sobol points (:class:`SobolWarmup`) on the parameters' search scales
  (log, and ``reverse_log`` through its stored ``one_minus_`` log distribution), indexed by trial
  number, so parallel asks spread over the space instead of repeating random clumps;
* then one of Optuna's own samplers with its options (TPE keeps its constant liar, GP its handling
  of running trials), switching to TPE where GP's cost per ask grows too large.

The rule table (docs/study-definition.md, "Choosing a sampler") is :func:`choose`; tests cover every row.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

WARMUP = "sobol"
"""The stage type of the Sobol warm-up (every other stage type is a key of ``SAMPLERS``)."""

GP_MAX_DIMS = 16
"""GP only for spaces of at most this many parameters (its fit grows with the dimension)."""
GP_SWITCH_TRIAL = 200
"""GP hands over to TPE from this trial number on (its fit grows cubically with the history)."""
WARMUP_TRIALS = 10
"""Sobol warm-up trials (at least max_parallel + 2 where more run at once)."""


@dataclass(frozen=True)
class Shape:
    """What the choice depends on: the search space, the objectives and the budget."""

    numeric: int
    categorical: int
    conditional: int
    objectives: int
    n_trials: int
    max_parallel: int | None = None

    @property
    def dims(self) -> int:
        return self.numeric + self.categorical


@dataclass(frozen=True)
class Stage:
    """One sampler from trial number ``start`` on."""

    start: int
    type: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AutoChoice:
    """The chosen stages and the rule (a row of the table) that chose them."""

    rule: str
    stages: tuple[Stage, ...]

    def stage_for(self, trial_number: int) -> Stage:
        """The stage that samples trial ``trial_number``."""
        current = self.stages[0]
        for stage in self.stages:
            if stage.start <= trial_number:
                current = stage
        return current

    def describe(self) -> dict[str, Any]:
        """The choice as the API and the dashboard show it."""
        return {
            "type": "auto",
            "rule": self.rule,
            "stages": [
                {"from_trial": s.start, "type": s.type, "options": dict(s.options)} for s in self.stages
            ],
        }


def warmup_trials(shape: Shape) -> int:
    """Sobol points before the model-based sampler: Optuna's 10 start-up trials, or what runs at once
    plus 2, at most a third of the budget."""
    wanted = max(WARMUP_TRIALS, (shape.max_parallel or 1) + 2)
    return max(1, min(wanted, shape.n_trials // 3))


def choose(shape: Shape) -> AutoChoice:
    """The rule table (docs/study-definition.md, "Choosing a sampler"): the first row that holds chooses.

    Every choice starts with W = :func:`warmup_trials` Sobol points; the model-based stage then starts
    modelling from max(2, W - max_parallel + 1) complete trials.

    | rule | when | after the warm-up |
    |---|---|---|
    | multi_objective | several objectives | TPE (multivariate, constant liar) |
    | conditional | a parameter has ``when`` | TPE (multivariate, group, constant liar) |
    | small_numeric | max_parallel 1, at most 16 parameters, all numeric | GP; TPE from trial 200 |
    | default | anything else | TPE (multivariate, constant liar) |
    """
    warm = warmup_trials(shape)
    # The model-based stage starts once the warm-up is handed out; with asks in flight fewer
    # trials are complete by then, so it models from the first few results instead of waiting
    # for as many complete trials as Optuna's default start-up.
    startup = max(2, warm - (shape.max_parallel or 1) + 1)
    tpe = {"multivariate": True, "constant_liar": True, "n_startup_trials": startup}
    if shape.objectives > 1:
        return AutoChoice("multi_objective", (Stage(0, WARMUP), Stage(warm, "tpe", tpe)))
    if shape.conditional:
        return AutoChoice("conditional", (Stage(0, WARMUP), Stage(warm, "tpe", {**tpe, "group": True})))
    if shape.max_parallel == 1 and shape.categorical == 0 and shape.numeric <= GP_MAX_DIMS:
        stages = [Stage(0, WARMUP), Stage(warm, "gp", {"n_startup_trials": startup})]
        if shape.n_trials > GP_SWITCH_TRIAL:
            stages.append(Stage(GP_SWITCH_TRIAL, "tpe", tpe))
        return AutoChoice("small_numeric", tuple(stages))
    return AutoChoice("default", (Stage(0, WARMUP), Stage(warm, "tpe", tpe)))


_sobol_lock = threading.Lock()  # scipy's Sobol engine shares state between threads (as Optuna notes)


class SobolWarmup(BaseSampler):
    """Scrambled Sobol points over the unconditional parameters, point ``n`` for trial ``n``.

    Points map onto each distribution's own scale (log for log and reverse_log parameters; a
    categorical takes one coordinate split into equal parts), as Optuna's QMCSampler maps them, but
    the space comes from the study definition, so the very first trials (asked at once by parallel
    workers) are already Sobol points. Conditional parameters are sampled at random.

    Args:
        space: the unconditional parameters' distributions, by stored name.
        seed: the scramble seed, the same for every trial of the study.
        trial_seed: the seed of the random sampler for conditional parameters.
    """

    def __init__(self, space: Mapping[str, BaseDistribution], seed: int, trial_seed: int | None) -> None:
        self._space = dict(sorted(space.items()))
        self._seed = seed
        self._random = RandomSampler(seed=trial_seed)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {name: dist for name, dist in self._space.items() if not dist.single()}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        return sobol_params(search_space, self._seed, trial.number)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._random.after_trial(study, trial, state, values)


def preload() -> None:
    """Import what the warm-up samples with (``scipy.stats.qmc``: about 1 s of CPU on a 2-core machine).

    The server calls it on a thread of its own at start-up, so a study's first ask does not pay
    for the import (py-spy, 2026-12-07: 1.6 s of the first ask of an ``auto`` study). The CLI
    never imports it.
    """
    # lazy: importing it is the point; at module level the CLI would pay for it too
    from scipy.stats import qmc  # noqa: F401


def sobol_params(space: Mapping[str, BaseDistribution], seed: int, index: int) -> dict[str, Any]:
    """Point ``index`` of the scrambled Sobol sequence of ``seed``, mapped onto ``space``."""
    # lazy: scipy.stats.qmc is slow to import and only the warm-up needs it (the server preloads it)
    from optuna._transform import _SearchSpaceTransform
    from scipy.stats import qmc

    categorical = {n: d for n, d in space.items() if isinstance(d, CategoricalDistribution)}
    # A categorical takes one coordinate in [0, C): flooring gives each choice an equal share.
    pseudo = {n: FloatDistribution(0, len(d.choices)) for n, d in categorical.items()}
    transform = _SearchSpaceTransform({**space, **pseudo}, transform_0_1=True)
    with _sobol_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns that single points lose Sobol's balance
        engine = qmc.Sobol(len(space), scramble=True, seed=seed)
        if index > 0:
            engine.fast_forward(index)
        point = engine.random(1)[0]
    sample = transform.untransform(np.asarray(point))
    return {
        name: categorical[name].to_external_repr(min(int(value), len(categorical[name].choices) - 1))
        if name in categorical
        else value
        for name, value in sample.items()
    }
