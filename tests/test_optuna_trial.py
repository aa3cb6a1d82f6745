"""``caviar.Trial`` speaks ``optuna.Trial``: unmodified Optuna objectives, define-by-run over REST
(the suggest endpoint), ``report(value, step)`` in Optuna's order, ``optuna.TrialPruned``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest

import caviar
from caviar.service.api import create_app
from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.definition import StudyDefinition
from tests.service.helpers import external_study
from tests.service.test_dashboard import free_port, live_server


@pytest.fixture
def base(db: Database, db_url: str, tmp_path: Path) -> Iterator[str]:
    settings = Settings(
        database_url=db_url,
        heartbeat_interval_s=5.0,
        artifact_dir=str(tmp_path / "artifacts"),
        api_token=None,
        background_tasks=False,
    )
    with live_server(create_app(settings, db=db), free_port()) as url:
        yield url


@pytest.fixture
def client(base: str) -> Iterator[caviar.Client]:
    with caviar.Client(base, retry_s=5) as client:
        yield client


def undeclared_study(name: str, n_trials: int, **extra: Any) -> dict[str, Any]:
    """A define-by-run study: no search space; the objective suggests everything."""
    return {
        "name": name,
        "direction": "maximize",
        "objective": {"kind": "external"},
        "sampler": {"type": "tpe", "seed": 0, "options": {"n_startup_trials": 4}},
        "pruner": {"type": "threshold", "options": {"lower": 0.4}},
        "budget": {"n_trials": n_trials},
        **extra,
    }


def objective(trial: optuna.Trial) -> float:
    """An unmodified Optuna objective: define-by-run, an int-parent conditional, pruning."""
    n_layers = trial.suggest_int("n_layers", 1, 3)
    widths = [trial.suggest_int(f"n_units_l{i}", 4, 64, log=True) for i in range(n_layers)]
    if n_layers > 1:  # a conditional parameter under an int parent
        trial.suggest_float("dropout", 0.0, 0.5)
    x = trial.suggest_float("x", 0.0, 1.0)
    optimizer = trial.suggest_categorical("optimizer", ["adam", "sgd"])
    trial.set_user_attr("first_width", widths[0])
    for step in range(3):
        trial.report(x + 0.01 * step, step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return x + (0.05 if optimizer == "adam" else 0.0)


def check_objective_trials(trials: list[dict[str, Any]], n_trials: int) -> None:
    """Every trial complete or pruned (none failed, none retried), with its define-by-run params."""
    assert len(trials) == n_trials, trials
    states = [t["state"] for t in trials]
    assert set(states) == {"complete", "pruned"}, states
    assert all(t["retry_of"] is None for t in trials)
    for trial in trials:
        params = trial["params"]
        n_layers = params["n_layers"]
        widths = {f"n_units_l{i}" for i in range(n_layers)}
        expected = {"n_layers", "x", "optimizer", *widths} | ({"dropout"} if n_layers > 1 else set())
        assert set(params) == expected, params
        pruned = trial["state"] == "pruned"
        assert pruned == (params["x"] < 0.4), trial  # the threshold pruner, at the first report
        assert len(trial["intermediate_values"]) == (1 if pruned else 3)
    assert {t["params"]["n_layers"] for t in trials} >= {1, 2}  # both sides of the condition


def test_an_unmodified_optuna_objective_runs_through_optimize(client: caviar.Client) -> None:
    study = client.create_study(undeclared_study("optuna-objective", 12))
    assert study.optimize(objective) == 12
    trials = study.trials()
    check_objective_trials(trials, 12)
    complete = [t for t in trials if t["state"] == "complete"]
    assert all(
        t["user_attrs"]["first_width"] == t["params"]["n_units_l0"] for t in complete
    )  # set_user_attr reached the service
    assert study.info()["state"] == "completed"


def test_optuna_trial_pruned_in_a_with_block_prunes(client: caviar.Client) -> None:
    study = client.create_study(undeclared_study("with-block", 2))
    with study.ask() as trial:
        trial.suggest_float("x", 0.0, 1.0)
        raise optuna.TrialPruned()
    [told] = study.trials()
    assert told["state"] == "pruned"


def test_declared_names_answer_the_asked_value_and_check_the_call(client: caviar.Client) -> None:
    study = client.create_study(external_study("declared", n_trials=3))
    with study.ask() as trial:
        asked = dict(trial.params)
        assert trial.suggest_float("lr", 1e-4, 1e-1, log=True) == asked["lr"]
        assert trial.suggest_float("dropout", 0.0, 0.6) == asked["dropout"]
        with pytest.raises(caviar.CaviarApiError) as mismatch:
            trial.suggest_float("lr", 1e-4, 1e-1)  # declared with scale log
        assert mismatch.value.status == 422 and mismatch.value.code == "suggest_mismatch"
        assert "log=False" in mismatch.value.message and "scale: log" in mismatch.value.message
        with pytest.raises(caviar.CaviarApiError) as ranged:
            trial.suggest_float("dropout", 0.0, 0.5)
        assert ranged.value.code == "suggest_mismatch" and "high: 0.6" in ranged.value.message
        with pytest.raises(caviar.CaviarApiError) as typed:
            trial.suggest_int("dropout", 0, 1)
        assert typed.value.code == "suggest_mismatch" and "suggest_int('dropout'" in typed.value.message
        with pytest.raises(caviar.CaviarApiError) as reversed_:
            trial.suggest_float("beta1", 0.8, 0.999)
        assert reversed_.value.code == "suggest_mismatch" and "reverse_log" in reversed_.value.message
        trial.tell(1.0)


def test_undeclared_names_are_sampled_once_and_checked_again(client: caviar.Client, base: str) -> None:
    study = client.create_study(external_study("undeclared", n_trials=3))
    with study.ask() as trial:
        units = trial.suggest_int("units", 1, 8)
        assert 1 <= units <= 8 and trial.params["units"] == units
        assert trial.suggest_int("units", 1, 8) == units
        path = f"{base}/api/v1/studies/undeclared/trials/{trial.number}/suggest"
        body = {"name": "units", "distribution": {"name": "IntDistribution", "attributes": {
            "low": 1, "high": 8, "step": 1, "log": False}}}  # fmt: skip
        assert httpx.post(path, json=body).json() == {"value": units}  # idempotent on the service too
        with pytest.raises(caviar.CaviarApiError) as other:
            trial.suggest_int("units", 1, 16)
        assert other.value.status == 409 and other.value.code == "distribution_mismatch"
        for reserved in ("caviar_x", "one_minus_y"):
            with pytest.raises(caviar.CaviarApiError) as refused:
                trial.suggest_float(reserved, 0.0, 1.0)
            assert refused.value.code == "reserved_name"
        with pytest.raises(caviar.CaviarApiError) as invalid:
            trial.suggest_float("bad", 1.0, 0.0)
        assert invalid.value.code == "invalid_distribution"
        assert set(trial.distributions) == {"units"}
        assert trial.distributions["units"] == optuna.distributions.IntDistribution(1, 8)
        trial.tell(1.0)
    [told] = study.trials()
    assert told["params"]["units"] == units  # stored in Optuna's tables (the dashboard shows it)


def test_a_retry_gets_the_same_undeclared_values(client: caviar.Client) -> None:
    study = client.create_study(undeclared_study("retry", 3, pruner={"type": "none"}))
    with pytest.raises(RuntimeError), study.ask() as first:
        drawn = (first.suggest_float("x", 0.0, 1.0), first.suggest_categorical("c", ["a", "b", "c"]))
        raise RuntimeError("out of memory")
    with study.ask() as retry:
        assert retry.retry_of == first.number
        assert (retry.suggest_float("x", 0.0, 1.0), retry.suggest_categorical("c", ["a", "b", "c"])) == drawn
        retry.tell(1.0)


def test_report_takes_optunas_order_only(client: caviar.Client) -> None:
    study = client.create_study(external_study("order", n_trials=2))
    with study.ask() as trial:
        with pytest.raises(TypeError, match=r"step must be an int"):
            trial.report(3, 0.91)  # type: ignore[arg-type]  # the old order (step, value)
        with pytest.raises(TypeError, match=r"value 1 is an int"):
            trial.report(1, 2)
        trial.report(0.5, 1)
        trial.tell(0.5)
    [told] = study.trials()
    assert told["intermediate_values"] == {"1": 0.5}  # only the call in Optuna's order was stored


def test_a_study_needs_no_search_space_except_for_the_trainer(client: caviar.Client) -> None:
    for kind in (
        {"kind": "external"},
        {"kind": "python", "entrypoint": "m:f"},
        {"kind": "command", "command": ["x"]},
    ):
        body = {"name": f"empty-{kind['kind']}", "objective": kind}
        assert client.create_study(body).info()["definition"]["search_space"] == {}
    with pytest.raises(caviar.CaviarApiError) as trainer:
        client.create_study({"name": "empty-trainer", "objective": {"kind": "trainer", "dataset": "digits"}})
    assert trainer.value.status == 422 and "search_space" in trainer.value.message


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"format": "regex"}, "needs a pattern"),
        ({"format": "regex", "pattern": "epoch (?P<step>\\d+)"}, "(?P<value>"),
        ({"format": "regex", "pattern": "(?P<value>["}, "not a valid regular expression"),
        ({"format": "stdout", "pattern": "x"}, "only for format regex"),
        ({"format": "jsonl", "file": "../metrics.jsonl"}, "inside the trial's directory"),
        ({"format": "stdout", "file": "m.jsonl"}, "only for format jsonl"),
        ({"format": "csv"}, "format"),
    ],
)
def test_the_metrics_option_is_checked(metrics: dict[str, Any], message: str) -> None:
    body = {"name": "m", "objective": {"kind": "command", "command": ["python", "t.py"], "metrics": metrics}}
    with pytest.raises(ValueError, match=re.escape(message)):
        StudyDefinition.model_validate(body)
    with pytest.raises(ValueError, match="only for kind command"):
        StudyDefinition.model_validate({"name": "m", "objective": {"kind": "external", "metrics": {}}})


def test_a_fatal_failure_is_not_retried_and_pauses_the_study(client: caviar.Client) -> None:
    study = client.create_study(external_study("fatal", n_trials=5, max_retries=2))
    with pytest.raises(caviar.CaviarApiError) as complete:
        client.http.post(
            f"/api/v1/studies/fatal/trials/{study.ask(heartbeat=False).number}/tell",
            json={"state": "complete", "value": 1.0, "fatal": True},
        )
    assert complete.value.status == 422 and "fatal" in complete.value.message
    trial = study.ask(heartbeat=False)
    trial.fail("the program printed nothing caviar recognises", fatal=True)
    info = study.info()
    assert info["state"] == "paused", info
    assert info["stop_reason"] == "paused: the program printed nothing caviar recognises"
    assert [t["state"] for t in study.trials() if t["number"] == trial.number] == ["fail"]
    assert not [t for t in study.trials() if t["retry_of"] == trial.number]  # not retried
    with pytest.raises(caviar.CaviarApiError) as paused:
        study.ask(wait=False)
    assert paused.value.code == "study_paused"
