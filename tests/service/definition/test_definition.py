"""Study definitions: every invalid case of DESIGN.md is a 422 naming the field; valid ones map to Optuna."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import ValidationError

from caviar.service.definition import StudyDefinition, build_pruner, check_params, decode_params, encode
from caviar.service.errors import InvalidInput
from caviar.service.examples import example_path

BASE: dict[str, Any] = yaml.safe_load(example_path("digits-mlp").read_text())


def variant(path: str, value: Any) -> dict[str, Any]:
    """BASE with the dotted ``path`` set to ``value`` (``...=DELETE`` removes it)."""
    body = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = body
    for key in parents:
        node = node.setdefault(key, {})
    if value == "DELETE":
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return body


INVALID = [
    ("low >= high", variant("search_space.lr.low", 0.5), "search_space.lr", "low must be < high"),
    ("log with low <= 0", variant("search_space.lr.low", 0.0), "search_space.lr", "log needs low > 0"),
    ("reverse_log high 1", variant("search_space.beta1.high", 1.0), "search_space.beta1", "reverse_log"),
    ("reverse_log low < 0", variant("search_space.beta1.low", -0.1), "search_space.beta1", "reverse_log"),
    ("empty choices", variant("search_space.optimizer.choices", []), "search_space.optimizer.choices", "at least 1 item"),
    ("duplicate choices", variant("search_space.batch_size.choices", [32, 32]), "search_space.batch_size", "distinct"),
    ("equal choices", variant("search_space.batch_size.choices", [1, 1.0, True]), "search_space.batch_size", "are equal"),
    ("empty search_space", variant("search_space", {}), "search_space", "at least one"),
    ("unknown type", variant("search_space.lr.type", "complex"), "search_space.lr", "float"),
    ("unknown scale", variant("search_space.lr.scale", "cubic"), "search_space.lr.scale", "reverse_log"),
    ("int log low 0", variant("search_space.hidden_units.low", 0), "search_space.hidden_units", "low >= 1"),
    ("unknown trainer hp", variant("search_space.colour", {"type": "int", "low": 1, "high": 3}), "search_space", "colour"),
    ("unknown fixed hp", variant("objective.fixed", {"colour": 1}), "objective", "colour"),
    ("searched and fixed", variant("objective.fixed", {"lr": 0.1}), "search_space", "both searched and fixed"),
    ("unknown sampler", variant("sampler.type", "bayes"), "sampler.type", "nsga2"),
    ("unknown sampler option", variant("sampler.options", {"n_startup": 3}), "sampler.options", "n_startup"),
    ("bad sampler option value", variant("sampler.options", {"n_startup_trials": "x"}), "sampler.options", "n_startup_trials"),
    ("unknown pruner", variant("pruner.type", "early"), "pruner.type", "hyperband"),
    ("unknown pruner option", variant("pruner.options", {"eta": 3}), "pruner.options", "eta"),
    ("n_trials 0", variant("budget.n_trials", 0), "budget.n_trials", "greater than or equal to 1"),
    ("max_parallel 0", variant("budget.max_parallel", 0), "budget.max_parallel", "greater than or equal to 1"),
    ("metric count", variant("metric", ["a", "b"]), "metric", "2 metric name(s) for 1 direction(s)"),
    ("directions + metric count", variant("directions", ["maximize", "minimize"]), "directions", "either direction or directions"),
    ("bad name", variant("name", "-bad name"), "name", "pattern"),
    ("long name", variant("name", "a" * 129), "name", "at most 128"),
    ("reserved one_minus_", variant("search_space.one_minus_x", {"type": "float", "low": 0, "high": 1}), "search_space", "one_minus_"),
    ("reserved caviar", variant("search_space.caviar_x", {"type": "float", "low": 0, "high": 1}), "search_space", "caviar"),
    ("when on unknown parent", variant("search_space.momentum.when", {"colour": ["red"]}), "search_space", "categorical"),
    ("when value not a choice", variant("search_space.momentum.when", {"optimizer": ["lion"]}), "search_space", "among its choices"),
    ("unknown field", variant("budget.n_trails", 3), "budget.n_trails", "not permitted"),
    ("unknown dataset", variant("objective.dataset", "imagenet"), "objective", "dataset"),
    ("nan bound", variant("search_space.dropout.high", float("nan")), "search_space.dropout", "finite"),
    ("grid needs a step", variant("sampler", {"type": "grid"}), "sampler", "grid needs a step"),
    ("trainer metric unknown", variant("metric", "f1"), "metric", "the trainer reports"),
    ("goal not finite", variant("budget.goal", {"value": float("inf")}), "budget.goal.value", "finite"),
    ("goal of several objectives", {**variant("directions", ["maximize", "minimize"]), "direction": None, "metric": ["val_accuracy", "val_loss"], "budget": {"goal": {"value": 1}}}, "budget.goal", "single-objective"),
    ("max_duration_s 0", variant("budget.max_duration_s", 0), "budget.max_duration_s", "greater than 0"),
    ("warm start from itself", variant("warm_start", {"from": "digits-mlp"}), "warm_start.from", "itself"),
    ("warm start top_k 0", variant("warm_start", {"from": "other", "top_k": 0}), "warm_start.top_k", "greater than or equal to 1"),
    ("warm start bad name", variant("warm_start", {"from": "-x"}), "warm_start.from", "pattern"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "field", "words"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_definitions_are_422_naming_the_field(
    client: TestClient, case: str, body: dict[str, Any], field: str, words: str
) -> None:
    raw = json.dumps(body)  # allows the NaN literal, as a careless client would send it
    response = client.post("/api/v1/studies", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, (case, response.text)
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert field and words, "every case names the field and the words it expects"  # "" matches anything
    fields = [d["field"] for d in error["details"]]
    assert any(f == field or f.startswith(field + ".") for f in fields), (case, fields)
    assert words.lower() in (error["message"] + " ".join(d["message"] for d in error["details"])).lower(), (
        error
    )
    assert error["message"].startswith(tuple(f"{f}: " for f in fields if f)), error["message"]
    assert client.get("/api/v1/studies").json()["total"] == 0  # nothing half-created


def test_example_maps_to_optuna_distributions_and_back() -> None:
    definition = StudyDefinition.model_validate(BASE)
    dists = definition.distributions()
    assert dists["lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    one_minus = dists["one_minus_beta1"]
    assert isinstance(one_minus, FloatDistribution) and one_minus.log
    assert math.isclose(one_minus.low, 0.001) and math.isclose(one_minus.high, 0.2)
    assert dists["dropout"] == FloatDistribution(0.0, 0.6)
    assert dists["hidden_units"] == IntDistribution(32, 512, log=True)
    assert dists["batch_size"] == CategoricalDistribution((32, 64, 128, 256))
    assert "one_minus_momentum" in dists and "momentum" not in dists
    stored = {
        "lr": 0.01,
        "one_minus_beta1": encode(definition.search_space["beta1"], 0.95),
        "dropout": 0.1,
    }
    decoded = decode_params(definition.search_space, stored)
    assert decoded["lr"] == 0.01 and math.isclose(decoded["beta1"], 0.95) and decoded["dropout"] == 0.1
    again = StudyDefinition.model_validate(definition.model_dump(mode="json"))
    assert again.distributions() == dists


def test_defaults_multi_objective_and_json_round_trip() -> None:
    definition = StudyDefinition.model_validate(
        {"name": "m", "directions": ["maximize", "minimize"], "metric": ["acc", "ms"],
         "search_space": {"x": {"type": "int", "low": 1, "high": 4}}}
    )  # fmt: skip
    assert definition.multi_objective and definition.metrics == ["acc", "ms"]
    assert definition.sampler.type == "auto" and definition.sampler.options == {}


def test_check_params_snaps_encodes_and_names_every_problem() -> None:
    space = StudyDefinition.model_validate(BASE).search_space
    good = {
        "lr": 0.01,
        "beta1": 0.95,
        "dropout": 0.6,
        "batch_size": 64,
        "hidden_units": 128,
        "optimizer": "adam",
    }
    checked = check_params(space, good)
    assert checked.decoded == good
    assert checked.stored["one_minus_beta1"] == encode(space["beta1"], 0.95)
    assert "beta1" not in checked.stored and checked.stored["batch_size"] == 64
    assert checked.decoded_attrs(space) == {"beta1": 0.95}
    assert set(checked.distributions) == set(checked.stored)
    # a bound an ulp away (a decode/encode round trip) is the bound, stored inside Optuna's range
    edge = check_params(space, {**good, "beta1": math.nextafter(0.999, 1.0), "dropout": 0.6 + 1e-15})
    assert edge.decoded["beta1"] == 0.999 and edge.decoded["dropout"] == 0.6
    low = StudyDefinition.model_validate(BASE).distributions()["one_minus_beta1"]
    assert low.low <= edge.stored["one_minus_beta1"] <= low.high  # type: ignore[attr-defined]
    # a categorical choice keeps its kind: 64.0 is 64, True is not 1
    assert check_params(space, {**good, "batch_size": 64.0}).stored["batch_size"] == 64
    with pytest.raises(InvalidInput) as caught:
        check_params(space, {**good, "batch_size": True, "lr": 2.0, "colour": "red"}, where="x")
    fields = [(d["field"], d["type"]) for d in caught.value.details]
    assert fields == [
        ("x.colour", "unknown_parameter"),
        ("x.lr", "out_of_range"),
        ("x.batch_size", "invalid_choice"),
    ]
    assert caught.value.code == "unknown_parameter" and caught.value.message.startswith("x.colour: ")


def test_check_params_conditions_full_and_partial() -> None:
    space = StudyDefinition.model_validate(BASE).search_space
    base = {"lr": 0.01, "beta1": 0.95, "dropout": 0.1, "batch_size": 64, "hidden_units": 128}
    assert "momentum" in check_params(space, {**base, "optimizer": "momentum", "momentum": 0.9}).decoded
    with pytest.raises(InvalidInput) as missing:
        check_params(space, {**base, "optimizer": "momentum"})
    assert missing.value.code == "missing_parameter" and "optimizer in ['momentum']" in missing.value.message
    with pytest.raises(InvalidInput) as inactive:
        check_params(space, {**base, "optimizer": "adam", "momentum": 0.9})
    assert inactive.value.code == "inactive_parameter" and "optimizer='adam'" in inactive.value.message
    # a wrong parent is the one problem named, not its child
    with pytest.raises(InvalidInput) as parent:
        check_params(space, {**base, "optimizer": "lion", "momentum": 0.9})
    assert [d["field"] for d in parent.value.details] == ["params.optimizer"]
    # partial (an ask's fixed values): missing parameters are fine, conditions only when decidable
    assert check_params(space, {"momentum": 0.9}, partial=True).decoded == {"momentum": 0.9}
    with pytest.raises(InvalidInput):
        check_params(space, {"optimizer": "adam", "momentum": 0.9}, partial=True)


def test_patient_pruner_without_wrapped_prunes_on_stagnation() -> None:
    import optuna

    pruner = build_pruner("patient", {"patience": 2})
    assert isinstance(pruner, optuna.pruners.PatientPruner) and pruner._wrapped_pruner is None
    study = optuna.create_study(direction="maximize", pruner=pruner)
    improving, flat = study.ask(), study.ask()
    for step, value in enumerate([0.1, 0.2, 0.3, 0.4]):
        improving.report(value, step)
    for step, value in enumerate([0.9, 0.5, 0.5, 0.5]):  # no better than 3 steps ago
        flat.report(value, step)
    assert not improving.should_prune()
    assert flat.should_prune()
    wrapped = build_pruner("patient", {"patience": 1, "wrapped": {"type": "median"}})
    assert isinstance(wrapped._wrapped_pruner, optuna.pruners.MedianPruner)  # type: ignore[attr-defined]


def test_only_an_external_study_may_declare_no_search_space() -> None:
    """Its clients sample (``caviar.optuna_storage``); every other kind needs parameters to run."""
    external = StudyDefinition.model_validate(
        {"name": "ext", "objective": {"kind": "external"}, "search_space": {}}
    )
    assert external.search_space == {}
    with pytest.raises(ValidationError, match="at least one parameter"):
        StudyDefinition.model_validate(variant("search_space", {}))
