"""REST tests of /api/v1/studies and /healthz (run on SQLite and PostgreSQL)."""

from __future__ import annotations

import copy
from typing import Any

import optuna
import pytest
import yaml
from fastapi.testclient import TestClient

from caviar.service.examples import example_path

EXAMPLE: dict[str, Any] = yaml.safe_load(example_path("digits-mlp").read_text())


def definition(name: str = "s1", **overrides: Any) -> dict[str, Any]:
    body = copy.deepcopy(EXAMPLE)
    body["name"] = name
    body["objective"] = {"kind": "external"}
    body.update(overrides)
    return body


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_create_links_a_real_optuna_study(client: TestClient, db_url: str) -> None:
    response = client.post("/api/v1/studies", json=definition("digits-mlp"))
    assert response.status_code == 201, response.text
    study = response.json()
    assert study["name"] == "digits-mlp"
    assert study["state"] == "queued"
    assert study["trial_counts"] == {"waiting": 0, "running": 0, "complete": 0, "pruned": 0, "fail": 0}
    assert study["best"] is None
    assert study["definition"]["search_space"]["beta1"]["scale"] == "reverse_log"
    loaded = optuna.load_study(study_name="digits-mlp", storage=db_url)
    assert loaded.direction == optuna.study.StudyDirection.MAXIMIZE


def test_trainer_example_is_accepted(client: TestClient) -> None:
    body = copy.deepcopy(EXAMPLE)
    assert client.post("/api/v1/studies", json=body).status_code == 201


def test_duplicate_name_is_409(client: TestClient, db_url: str) -> None:
    assert client.post("/api/v1/studies", json=definition("dup")).status_code == 201
    response = client.post("/api/v1/studies", json=definition("dup"))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "name_taken"
    optuna.create_study(study_name="made-by-optuna", storage=db_url)
    response = client.post("/api/v1/studies", json=definition("made-by-optuna"))
    assert response.status_code == 409


def test_get_list_filter_paginate(client: TestClient) -> None:
    for i in range(5):
        body = definition(f"s{i}", tags={"team": "vision" if i % 2 else "nlp", "size": str(i % 3)})
        assert client.post("/api/v1/studies", json=body).status_code == 201
    assert client.get("/api/v1/studies/s3").json()["name"] == "s3"
    page = client.get("/api/v1/studies", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 5
    assert [s["name"] for s in page["items"]] == ["s3", "s2"]
    vision = client.get("/api/v1/studies", params={"tag": "team=vision"}).json()
    assert sorted(s["name"] for s in vision["items"]) == ["s1", "s3"]
    assert client.get("/api/v1/studies", params={"tag": "team"}).json()["total"] == 5
    both = client.get("/api/v1/studies", params={"tag": ["team=vision", "size=1"]}).json()
    assert [s["name"] for s in both["items"]] == ["s1"]  # repeated tags: every one must match
    assert client.get("/api/v1/studies", params={"state": "paused"}).json()["total"] == 0
    assert client.get("/api/v1/studies", params={"state": "bogus"}).status_code == 422


def test_pause_resume_delete(client: TestClient, db_url: str) -> None:
    client.post("/api/v1/studies", json=definition("p"))
    paused = client.post("/api/v1/studies/p/pause")
    assert paused.status_code == 200 and paused.json()["state"] == "paused"
    again = client.post("/api/v1/studies/p/pause")
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_state"
    resumed = client.post("/api/v1/studies/p/resume")
    assert resumed.status_code == 200 and resumed.json()["state"] == "queued"
    assert client.post("/api/v1/studies/p/resume").status_code == 409
    assert client.delete("/api/v1/studies/p").status_code == 204
    assert client.get("/api/v1/studies/p").status_code == 404
    assert client.delete("/api/v1/studies/p").status_code == 404
    with pytest.raises(KeyError):
        optuna.load_study(study_name="p", storage=db_url)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/v1/studies/missing"),
        ("delete", "/api/v1/studies/missing"),
        ("post", "/api/v1/studies/missing/pause"),
        ("post", "/api/v1/studies/missing/resume"),
        ("get", "/api/v1/nowhere"),
    ],
)
def test_404_in_envelope(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] in {"study_not_found", "not_found"}
    assert error["message"]


def test_405_and_malformed_json_in_envelope(client: TestClient) -> None:
    response = client.put("/api/v1/studies")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    response = client.post(
        "/api/v1/studies", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


def test_openapi_documents_the_envelope(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "ErrorEnvelope" in spec["components"]["schemas"]
    post = spec["paths"]["/api/v1/studies"]["post"]
    assert {"409", "422"} <= set(post["responses"])
