"""``sampler: {type: auto}``: every row of the choice rule, the Sobol warm-up, determinism, the API."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient

from caviar.service.definition import StudyDefinition
from caviar.service.definition._auto import (
    GP_SWITCH_TRIAL,
    WARMUP,
    AutoChoice,
    Shape,
    SobolWarmup,
    choose,
    warmup_trials,
)

TPE = {"multivariate": True, "constant_liar": True}


def shape(**kw: Any) -> Shape:
    base: dict[str, Any] = {
        "numeric": 4,
        "categorical": 0,
        "conditional": 0,
        "objectives": 1,
        "n_trials": 50,
        "max_parallel": None,
    }
    return Shape(**{**base, **kw})


def kinds(choice: AutoChoice) -> list[tuple[int, str]]:
    return [(s.start, s.type) for s in choice.stages]


# ---- the rule table, row by row --------------------------------------------------------------


def test_row_multi_objective_is_sobol_then_multivariate_tpe() -> None:
    choice = choose(shape(objectives=2, numeric=3))
    assert choice.rule == "multi_objective"
    assert kinds(choice) == [(0, WARMUP), (10, "tpe")]
    assert TPE.items() <= dict(choice.stages[1].options).items()


def test_row_conditional_is_grouped_tpe_even_for_a_small_numeric_space() -> None:
    choice = choose(shape(numeric=2, categorical=1, conditional=1))
    assert choice.rule == "conditional"
    assert kinds(choice) == [(0, WARMUP), (10, "tpe")]
    assert {**TPE, "group": True}.items() <= dict(choice.stages[1].options).items()


def test_row_small_numeric_is_sobol_then_gp() -> None:
    choice = choose(shape(numeric=16, n_trials=GP_SWITCH_TRIAL, max_parallel=1))
    assert choice.rule == "small_numeric"
    assert kinds(choice) == [(0, WARMUP), (10, "gp")]


def test_row_small_numeric_hands_over_to_tpe_past_the_switch_point() -> None:
    choice = choose(shape(numeric=3, n_trials=GP_SWITCH_TRIAL + 1, max_parallel=1))
    assert kinds(choice) == [(0, WARMUP), (10, "gp"), (GP_SWITCH_TRIAL, "tpe")]
    assert choice.stage_for(GP_SWITCH_TRIAL - 1).type == "gp"
    assert choice.stage_for(GP_SWITCH_TRIAL).type == "tpe"


@pytest.mark.parametrize(
    "case",
    [
        shape(numeric=0, categorical=6, max_parallel=1),
        shape(numeric=17, max_parallel=1),
        shape(numeric=6, categorical=3, max_parallel=1),
        shape(numeric=4, max_parallel=8),
        shape(numeric=4, max_parallel=None),
    ],
    ids=["all categorical", "17 numeric", "mixed", "numeric, 8 in parallel", "numeric, parallel unknown"],
)
def test_row_default_is_multivariate_tpe(case: Shape) -> None:
    choice = choose(case)
    assert choice.rule == "default"
    assert kinds(choice) == [(0, WARMUP), (warmup_trials(case), "tpe")]
    assert TPE.items() <= dict(choice.stages[1].options).items()


def test_warm_up_covers_what_runs_at_once_and_at_most_a_third_of_the_budget() -> None:
    assert warmup_trials(shape()) == 10
    assert warmup_trials(shape(max_parallel=8)) == 10
    assert warmup_trials(shape(max_parallel=16, n_trials=100)) == 18
    assert warmup_trials(shape(max_parallel=16)) == 16  # a third of 50
    assert warmup_trials(shape(n_trials=12)) == 4
    assert warmup_trials(shape(n_trials=2)) == 1
    # the model-based stage models from the first results instead of waiting for 10 complete
    # trials (measured: with 8 in flight, 3 is much better on NAS-Bench-201, see docs/performance.md)
    assert choose(shape(max_parallel=8)).stages[1].options["n_startup_trials"] == 3
    assert choose(shape(max_parallel=16, n_trials=100)).stages[1].options["n_startup_trials"] == 3
    assert choose(shape()).stages[1].options["n_startup_trials"] == 10
    assert choose(shape(max_parallel=1)).stages[1].options["n_startup_trials"] == 10


def test_stage_for_walks_the_stages() -> None:
    choice = choose(shape(n_trials=1000, max_parallel=1))
    assert [choice.stage_for(n).type for n in (0, 9, 10, 199, 200, 999)] == [
        WARMUP,
        WARMUP,
        "gp",
        "gp",
        "tpe",
        "tpe",
    ]


# ---- from a definition -----------------------------------------------------------------------

SPACE: dict[str, Any] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1.0, "scale": "log"},
    "beta1": {"type": "float", "low": 0.5, "high": 0.9999, "scale": "reverse_log"},
    "units": {"type": "int", "low": 16, "high": 512, "scale": "log"},
    "act": {"type": "categorical", "choices": ["relu", "tanh", "gelu", "silu"]},
}


def definition(**kw: Any) -> StudyDefinition:
    return StudyDefinition.model_validate({"name": "auto", "search_space": SPACE, **kw})


def test_auto_is_the_default_and_tpe_keeps_optunas_defaults() -> None:
    auto = definition()
    assert auto.sampler.type == "auto"
    assert auto.sampler_description()["rule"] == "default"  # SPACE has a categorical
    assert isinstance(auto.sampler_for(0), SobolWarmup)
    assert isinstance(auto.sampler_for(10), optuna.samplers.TPESampler)
    numeric = StudyDefinition.model_validate(
        {
            "name": "n",
            "search_space": {k: v for k, v in SPACE.items() if k != "act"},
            "budget": {"max_parallel": 1},
        }
    )
    assert numeric.sampler_description()["rule"] == "small_numeric"
    assert isinstance(numeric.sampler_for(10), optuna.samplers.GPSampler)
    tpe = definition(sampler={"type": "tpe"}).sampler_for(5)
    assert isinstance(tpe, optuna.samplers.TPESampler)
    assert tpe._n_startup_trials == 10 and tpe._constant_liar and tpe._multivariate is None
    assert definition(sampler={"type": "tpe"}).sampler_description() == {
        "type": "tpe",
        "seed": None,
        "options": {},
    }


def test_auto_refuses_options() -> None:
    with pytest.raises(ValueError, match="auto takes no options"):
        definition(sampler={"type": "auto", "options": {"n_startup_trials": 3}})


def _sample(defn: StudyDefinition, numbers: range) -> list[dict[str, Any]]:
    study = optuna.create_study()
    out = []
    for n in numbers:
        study.sampler = defn.sampler_for(n)
        trial = study.ask()
        for name, dist in defn.distributions().items():
            trial._suggest(name, dist)
        out.append(dict(trial.params))
        study.tell(trial, sum(hash(str(v)) % 7 for v in trial.params.values()))
    return out


@pytest.mark.parametrize("seed", [None, 3])
def test_the_warm_up_is_the_same_in_every_process(seed: int | None) -> None:
    """Two parses of the stored definition (two server processes) sample the same points."""
    body = definition(sampler={"type": "auto", "seed": seed}).model_dump(mode="json")
    first = _sample(StudyDefinition.model_validate(body), range(6))
    again = _sample(StudyDefinition.model_validate(body), range(6))
    assert first == again
    other = _sample(StudyDefinition.model_validate({**body, "name": "other"}), range(6))
    assert (other != first) == (seed is None)  # unseeded studies scramble by their definition


def test_the_warm_up_is_stratified_on_each_parameters_search_scale() -> None:
    """32 scrambled Sobol points put 8 in each decade of lr (log), of 1-beta1 (reverse_log, stored
    log) and 8 on each of 4 choices."""
    defn = definition(budget={"n_trials": 200, "max_parallel": 40})
    assert defn.auto_choice.stages[1].start >= 32
    study = optuna.create_study()
    lrs, betas, acts = [], [], []
    for n in range(32):
        sampler = defn.sampler_for(n)
        assert isinstance(sampler, SobolWarmup)
        study.sampler = sampler
        trial = study.ask()
        lrs.append(trial._suggest("lr", defn.distributions()["lr"]))
        betas.append(trial._suggest("one_minus_beta1", defn.distributions()["one_minus_beta1"]))
        acts.append(trial._suggest("act", defn.distributions()["act"]))
    assert sorted(math.floor(-math.log10(x)) for x in lrs) == sorted([0, 1, 2, 3] * 8)
    # 1 - beta1 in [1e-4, 0.5]: log-uniform, so each quarter of the log range holds 8 points
    quarter = (math.log(0.5) - math.log(1e-4)) / 4
    assert sorted(int((math.log(x) - math.log(1e-4)) // quarter) for x in betas) == sorted([0, 1, 2, 3] * 8)
    assert sorted(acts) == sorted(["relu", "tanh", "gelu", "silu"] * 8)


def test_conditional_parameters_are_sampled_at_random_during_the_warm_up() -> None:
    space = {
        **SPACE,
        "momentum": {"type": "float", "low": 0.8, "high": 0.99, "when": {"act": ["relu"]}},
    }
    defn = StudyDefinition.model_validate({"name": "c", "search_space": space})
    assert defn.auto_choice.rule == "conditional"
    study = optuna.create_study(sampler=defn.sampler_for(0))
    trial = study.ask()
    value = trial._suggest("momentum", defn.distributions()["momentum"])
    assert 0.8 <= value <= 0.99


# ---- the API and the dashboard ----------------------------------------------------------------


def test_the_choice_is_on_the_study_and_in_optuna(client: TestClient, db_url: str) -> None:
    numeric = {k: v for k, v in SPACE.items() if k != "act"}
    body = {"name": "auto-api", "search_space": numeric, "budget": {"n_trials": 300, "max_parallel": 1}}
    response = client.post("/api/v1/studies", json=body)
    assert response.status_code == 201, response.text
    sampler = response.json()["sampler"]
    assert sampler["type"] == "auto" and sampler["rule"] == "small_numeric"
    assert [(s["from_trial"], s["type"]) for s in sampler["stages"]] == [
        (0, WARMUP),
        (10, "gp"),
        (GP_SWITCH_TRIAL, "tpe"),
    ]
    assert client.get("/api/v1/studies/auto-api").json()["sampler"] == sampler
    loaded = optuna.load_study(study_name="auto-api", storage=db_url)
    assert loaded.user_attrs["caviar:sampler"] == sampler
    asked = client.post("/api/v1/studies/auto-api/trials/ask", json={}).json()
    assert set(asked["params"]) == set(numeric) and 0.5 <= asked["params"]["beta1"] <= 0.9999


@pytest.mark.parametrize("kind", ["auto", "tpe", "random", "qmc", "gp", "cmaes", "nsga2"])
def test_every_sampler_type_hands_out_trials(client: TestClient, kind: str) -> None:
    """Each sampler a definition may name samples over REST (cmaes needs its package installed)."""
    space = {
        "x": {"type": "float", "low": 1e-3, "high": 1.0, "scale": "log"},
        "y": {"type": "int", "low": 1, "high": 9},
    }
    body = {"name": f"s-{kind}", "search_space": space, "sampler": {"type": kind, "seed": 1}}
    assert client.post("/api/v1/studies", json=body).status_code == 201
    for _ in range(3):
        asked = client.post(f"/api/v1/studies/s-{kind}/trials/ask", json={})
        assert asked.status_code == 200, asked.text
        number, params = asked.json()["number"], asked.json()["params"]
        assert 1e-3 <= params["x"] <= 1.0 and 1 <= params["y"] <= 9
        told = client.post(
            f"/api/v1/studies/s-{kind}/trials/{number}/tell", json={"state": "complete", "value": params["x"]}
        )
        assert told.status_code == 200, told.text


def test_a_server_loads_the_warm_ups_imports_before_the_first_ask(tmp_path: Any) -> None:
    """``scipy.stats.qmc`` (about 1 s to import) loads on a thread of its own once the app starts,
    so the first ask of an ``auto`` study does not wait for it (a fresh interpreter: this process
    may have it already)."""
    script = f"""
import sys, time
from fastapi.testclient import TestClient
from caviar.service.api import create_app
from caviar.service.config import Settings
assert "scipy.stats._qmc" not in sys.modules, "imported before the server started"
with TestClient(create_app(Settings(database_url="sqlite:///{tmp_path / "c.db"}"))):
    deadline = time.monotonic() + 30
    while "scipy.stats._qmc" not in sys.modules:
        assert time.monotonic() < deadline, "not preloaded"
        time.sleep(0.05)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
