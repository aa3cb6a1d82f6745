"""``pruner: {type: pbt}``: options and their fit with the rest of the definition, checked as 422s."""

from __future__ import annotations

import copy
from typing import Any

import optuna
import pytest
import yaml
from fastapi.testclient import TestClient

from caviar.service.definition import StudyDefinition
from caviar.service.examples import example_path

BASE: dict[str, Any] = yaml.safe_load(example_path("digits-mlp").read_text())
BASE["objective"]["fuse"] = 8
BASE["pruner"] = {"type": "pbt", "options": {"interval": 4, "quantile": 0.25}}


def pbt(options: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(BASE)
    if options is not None:
        body["pruner"]["options"] = options
    for key, value in changes.items():
        body[key] = value if not isinstance(value, dict) else {**body.get(key, {}), **value}
    return body


INVALID = [
    ("quantile above 0.5", pbt({"quantile": 0.6}), "pruner.options", "options.quantile"),
    ("interval 0", pbt({"interval": 0}), "pruner.options", "options.interval"),
    ("unknown option", pbt({"interval": 2, "perturbation_interval": 3}), "pruner.options", "perturbation_interval"),
    ("resample above 1", pbt({"resample_probability": 1.5}), "pruner.options", "resample_probability"),
    ("seed is not perturbed", pbt({"perturb": {"params": ["seed"]}}), "pruner.options", "'seed' cannot be perturbed"),
    ("negative factor", pbt({"perturb": {"factors": [-0.8]}}), "pruner.options", "factors"),
    ("param not searched", pbt({"perturb": {"params": ["weight_decay"]}}), "pruner.options.perturb.params", "not in the search space"),
    ("interval >= max_epochs", pbt({"interval": 20}), "pruner.options.interval", "max_epochs"),
    ("not fused", pbt(objective={"fuse": 1}), "pruner", "objective.fuse >= 2"),
    ("not the trainer", pbt(objective={"kind": "external", "dataset": None, "fuse": None, "fixed": {}}), "pruner", "kind trainer"),
    ("nothing to perturb", pbt(search_space={"batch_size": {"type": "categorical", "choices": [32, 64]}}), "pruner.options.perturb.params", "no hyperparameter"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "field", "words"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_pbt_definitions_are_422_naming_the_field(
    client: TestClient, case: str, body: dict[str, Any], field: str, words: str
) -> None:
    if case == "nothing to perturb":
        body["search_space"] = {"batch_size": {"type": "categorical", "choices": [32, 64]}}
    response = client.post("/api/v1/studies", json=body)
    assert response.status_code == 422, (case, response.text)
    error = response.json()["error"]
    fields = [d["field"] for d in error["details"]]
    assert any(f == field or f.startswith(field + ".") for f in fields), (case, fields, error["message"])
    assert words.lower() in error["message"].lower(), error["message"]
    assert client.get("/api/v1/studies").json()["total"] == 0


def test_a_pbt_study_is_created_and_its_service_pruner_prunes_nothing(client: TestClient) -> None:
    response = client.post("/api/v1/studies", json=BASE)
    assert response.status_code == 201, response.text
    shown = client.get("/api/v1/studies/digits-mlp").json()["definition"]["pruner"]
    assert shown == {"type": "pbt", "options": {"interval": 4, "quantile": 0.25}}
    definition = StudyDefinition.model_validate(BASE)
    assert isinstance(definition.build_pruner(), optuna.pruners.NopPruner)
