"""Regression tests of the hardening findings (issue "Hardening"): each request below once answered
500, wrote half a state, took seconds or gigabytes, or was accepted while meaningless. Run on SQLite
and PostgreSQL (where NUL characters and 32-bit integers are real limits)."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from caviar.service.api import create_app
from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.definition._factories import _shuffled_grid
from tests.service.helpers import external_study

API = "/api/v1"


def error_code(response: Any) -> str:
    return str(response.json()["error"]["code"])


def counts(client: TestClient, name: str) -> dict[str, int]:
    return dict(client.get(f"{API}/studies/{name}").json()["trial_counts"])


def asked(client: TestClient, name: str, **body: Any) -> dict[str, Any]:
    response = client.post(f"{API}/studies/{name}/trials/ask", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


# ---- NUL characters: refused before anything is written --------------------------------------


@pytest.mark.parametrize("field", ["worker_id", "request_id"])
def test_a_nul_in_an_ask_identifier_is_422_and_claims_nothing(client: TestClient, field: str) -> None:
    client.post(f"{API}/studies", json=external_study("nul"))
    for _ in range(4):
        response = client.post(f"{API}/studies/nul/trials/ask", json={field: "\u0000"})
        assert response.status_code == 422 and field in response.json()["error"]["message"]
    assert counts(client, "nul") == {"waiting": 0, "running": 0, "complete": 0, "pruned": 0, "fail": 0}
    assert client.get(f"{API}/studies/nul").json()["state"] == "queued"


def test_a_nul_in_a_fail_reason_is_422_and_the_trial_keeps_running(client: TestClient) -> None:
    client.post(f"{API}/studies", json=external_study("reason"))
    number = asked(client, "reason")["number"]
    response = client.post(
        f"{API}/studies/reason/trials/{number}/tell", json={"state": "fail", "reason": "a\u0000b"}
    )
    assert response.status_code == 422
    assert client.get(f"{API}/studies/reason/trials/{number}").json()["state"] == "running"
    told = client.post(f"{API}/studies/reason/trials/{number}/tell", json={"state": "fail", "reason": "ok"})
    assert told.status_code == 200 and told.json()["state"] == "fail"
    assert counts(client, "reason")["waiting"] == 1  # its retry was queued


def test_a_nul_anywhere_in_a_definition_is_422_naming_where(client: TestClient) -> None:
    body = external_study("defnul")
    body["tags"] = {"team": "vi\u0000sion"}
    response = client.post(f"{API}/studies", json=body)
    assert response.status_code == 422 and "tags.team" in response.json()["error"]["message"]
    body = external_study("defnul")
    body["search_space"]["opt"] = {"type": "categorical", "choices": ["adam", "s\u0000gd"]}
    assert client.post(f"{API}/studies", json=body).status_code == 422


# ---- idempotent replays answer with the finished assignment ----------------------------------


def test_concurrent_replays_of_one_ask_all_get_the_whole_assignment(settings: Settings, db: Database) -> None:
    # room for all 12 at once: admission (429 too_many_asks) is tested in test_lease_isolation.py
    app = create_app(settings.model_copy(update={"max_concurrent_asks": 12}), db=db)
    with TestClient(app) as client:
        _replay_twelve_times(client)


def _replay_twelve_times(client: TestClient) -> None:
    body = external_study("replay", n_trials=5)
    body["search_space"] = {f"p{i}": {"type": "float", "low": 0.0, "high": 1.0} for i in range(30)}
    client.post(f"{API}/studies", json=body)
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def replay() -> None:
        response = client.post(
            f"{API}/studies/replay/trials/ask", json={"request_id": "same", "worker_id": "w"}
        )
        with lock:
            answers.append({"status": response.status_code, **response.json()})

    threads = [threading.Thread(target=replay) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == 12 and {a["status"] for a in answers} == {200}
    assert {a["number"] for a in answers} == {0}
    assert all(len(a["params"]) == 30 for a in answers), [len(a["params"]) for a in answers]
    assert len({json.dumps(a["params"], sort_keys=True) for a in answers}) == 1


# ---- requests that took the CPU or memory ------------------------------------------------------


@pytest.mark.parametrize(
    ("space", "sampler", "words"),
    [
        (
            {"x": {"type": "float", "low": 0.0, "high": 1.0, "step": 1e-7}},
            {"type": "grid"},
            "grid has more than",
        ),
        (
            {n: {"type": "int", "low": 0, "high": 99} for n in ("a", "b", "c")},
            {"type": "grid"},
            "grid has more than",
        ),
        (
            {"x": {"type": "float", "low": 0.0, "high": 1.0}},
            {"type": "tpe", "options": {"n_ei_candidates": 1000000}},
            "at most 1000",
        ),
        (
            {f"c{i}": {"type": "categorical", "choices": list(range(1000))} for i in range(200)},
            {"type": "random"},
            "categorical choices in all",
        ),
    ],
    ids=["grid-float-step-1e-7", "grid-3-ints-0-99", "n_ei_candidates-1e6", "200x1000-choices"],
)
def test_definitions_that_cost_seconds_or_gigabytes_per_ask_are_422(
    client: TestClient, space: dict[str, Any], sampler: dict[str, Any], words: str
) -> None:
    body = external_study("heavy")
    body["search_space"], body["sampler"] = space, sampler
    response = client.post(f"{API}/studies", json=body)
    assert response.status_code == 422 and words in response.json()["error"]["message"], response.text


def test_a_grid_is_built_once_per_process_and_visits_every_point_once(client: TestClient) -> None:
    body = external_study("grid", n_trials=12)
    body["search_space"] = {
        "a": {"type": "int", "low": 0, "high": 3},
        "b": {"type": "categorical", "choices": ["x", "y", "z"]},
    }
    body["sampler"] = {"type": "grid", "seed": 3}
    client.post(f"{API}/studies", json=body)
    before = _shuffled_grid.cache_info()
    points = set()
    for _ in range(12):
        trial = asked(client, "grid")
        points.add((trial["params"]["a"], trial["params"]["b"]))
        client.post(
            f"{API}/studies/grid/trials/{trial['number']}/tell", json={"state": "complete", "value": 1.0}
        )
    after = _shuffled_grid.cache_info()
    assert len(points) == 12  # every grid point once (the shuffle is the study's, not the trial's)
    assert after.misses - before.misses <= 1 and after.hits - before.hits >= 11


# ---- numbers out of range: 422/404, never 500 --------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/studies/s/trials/2147483648"),
        ("GET", "/studies/s/trials/2147483648/checkpoint"),
        ("POST", "/studies/s/trials/2147483648/heartbeat"),
        ("POST", "/studies/s/trials/9999999999999/report"),
        ("POST", "/studies/s/trials/2147483648/tell"),
        ("GET", "/studies?offset=9223372036854775808"),
        ("GET", "/studies/s/trials?offset=9223372036854775807"),
        ("GET", "/schedules/²"),
        ("GET", "/studies/name%00with%00nul"),
    ],
)
def test_numbers_and_names_out_of_range_are_422(client: TestClient, method: str, path: str) -> None:
    client.post(f"{API}/studies", json=external_study("s"))
    body = {"step": 0, "value": 1.0} if path.endswith("report") else {"state": "pruned"}
    response = client.request(method, API + path, json=body if method == "POST" else None)
    assert response.status_code == 422, response.text


def test_a_schedule_id_past_32_bits_is_404(client: TestClient) -> None:
    response = client.get(f"{API}/schedules/2147483648")
    assert response.status_code == 404 and error_code(response) == "schedule_not_found"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (("search_space", "lr", {"type": "float", "low": -1.7e308, "high": 1.7e308}), "than or equal"),
        (("search_space", "lr", {"type": "int", "low": 0, "high": 10**400}), "less than or equal"),
        (
            ("search_space", "lr", {"type": "float", "low": 0.0, "high": 1.0, "step": 1e-300}),
            "step is too small",
        ),
        (("search_space", "lr", {"type": "int", "low": 0, "high": 10, "step": 100}), "at most high - low"),
        (("budget", "trial_timeout_s", 1e12), "less than or equal"),
        (("objective", "fixed", {"layers": json.loads("[" * 900 + "]" * 900)}), "fixed"),
    ],
    ids=[
        "float-bounds-1.7e308",
        "int-high-1e400",
        "step-1e-300",
        "int-step-over-range",
        "timeout-1e12",
        "deep-fixed",
    ],
)
def test_definitions_whose_every_ask_failed_are_422(
    client: TestClient, change: tuple[Any, ...], words: str
) -> None:
    body = external_study("bounds")
    section, key, value = change
    body[section][key] = value
    response = client.post(f"{API}/studies", json=body)
    assert response.status_code == 422 and words in response.json()["error"]["message"], response.text
    assert client.post(f"{API}/studies", json=external_study("bounds")).status_code == 201  # name not blocked


@pytest.mark.parametrize("literal", ["1e400", "Infinity", "NaN"])
def test_non_finite_numbers_in_a_definition_are_422(client: TestClient, literal: str) -> None:
    text = json.dumps(external_study("inf")).replace('"n_trials": 10', '"n_trials": 10, "trial_timeout_s": X')
    response = client.post(
        f"{API}/studies", content=text.replace("X", literal), headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert client.post(f"{API}/studies", json=external_study("inf")).status_code == 201  # name not blocked


def test_a_failure_after_the_optuna_study_exists_leaves_nothing_behind(
    db: Database, client: TestClient
) -> None:
    import optuna

    from caviar.service import store

    definition = store.parse_definition(external_study("half"))
    original = db.optuna.set_study_user_attr

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the database refused the value")

    db.optuna.set_study_user_attr = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError):
            store.create_study(db, definition)
    finally:
        db.optuna.set_study_user_attr = original  # type: ignore[method-assign]
    assert "half" not in [s.study_name for s in optuna.get_all_study_summaries(db.optuna)]
    assert client.post(f"{API}/studies", json=external_study("half")).status_code == 201


# ---- meaningless input that was accepted -------------------------------------------------------


def test_report_step_must_be_an_integer_not_a_boolean(client: TestClient) -> None:
    client.post(f"{API}/studies", json=external_study("steps"))
    number = asked(client, "steps")["number"]
    response = client.post(f"{API}/studies/steps/trials/{number}/report", json={"step": True, "value": 0.5})
    assert response.status_code == 422


@pytest.mark.parametrize(
    ("schedule", "words"),
    [
        ({"timezone": "localtime"}, "depends on the host"),
        ({"timezone": "Factory"}, "depends on the host"),
        ({"end_at": "2020-01-01T00:00:00Z"}, "in the future"),
        ({"end_at": "0001-01-02T00:00:00Z"}, "between the years"),
        ({"end_at": "9999-12-31T00:00:00Z"}, "between the years"),
    ],
)
def test_schedules_that_could_never_fire_or_depend_on_the_host_are_422(
    client: TestClient, schedule: dict[str, Any], words: str
) -> None:
    template = external_study("x")
    del template["name"]
    body = {"name": "nightly", "cron": "0 3 * * *", "template": template, **schedule}
    response = client.post(f"{API}/schedules", json=body)
    assert response.status_code == 422 and words in response.json()["error"]["message"], response.text


def test_refine_keeps_a_stepped_float_on_its_grid_and_long_names_fit(client: TestClient) -> None:
    name = "n" * 128
    body = external_study(name, n_trials=20)
    body["search_space"]["dropout"] = {"type": "float", "low": 0.0, "high": 0.6, "step": 0.05}
    client.post(f"{API}/studies", json=body)
    for i in range(8):
        trial = asked(client, name)
        value = trial["params"]["dropout"] + i / 100
        client.post(
            f"{API}/studies/{name}/trials/{trial['number']}/tell", json={"state": "complete", "value": value}
        )
    refined = client.post(f"{API}/studies/{name}/refine", json={"margin": 0.13})
    assert refined.status_code == 201, refined.text
    assert len(refined.json()["name"]) <= 128 and refined.json()["name"].endswith("-refined-1")
    dropout = refined.json()["definition"]["search_space"]["dropout"]
    for bound in (dropout["low"], dropout["high"]):
        assert abs(bound / 0.05 - round(bound / 0.05)) < 1e-9, dropout


def test_short_or_empty_tokens_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for token in ("", "x", "a" * 31):
        monkeypatch.setenv("CAVIAR_API_TOKEN", token)
        with pytest.raises(ValueError, match="at least 32 characters"):
            Settings()
    monkeypatch.setenv("CAVIAR_API_TOKEN", "a" * 32)
    assert Settings().api_token is not None


def test_stored_files_are_private(client: TestClient, settings: Settings) -> None:
    client.post(f"{API}/studies", json=external_study("files"))
    number = asked(client, "files")["number"]
    stored = client.post(
        f"{API}/studies/files/trials/{number}/artifacts?filename=weights.pt",
        content=b"secret weights",
        headers={"content-type": "application/octet-stream"},
    )
    assert stored.status_code == 201
    path = Path(settings.artifact_dir) / stored.json()["artifact_id"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(settings.artifact_dir).st_mode) & 0o077 == 0


# ---- the dashboard ---------------------------------------------------------------------------


def test_the_dashboard_serves_its_bundle_without_accept_encoding_and_knows_the_artifacts(
    client: TestClient,
) -> None:
    bundle = client.get("/static/bundle.js", headers={"accept-encoding": ""})
    assert bundle.status_code == 200
    assert client.get("/api/meta").json()["artifact_is_available"] is True


def test_a_dashboard_tell_with_the_wrong_number_of_values_is_422(client: TestClient) -> None:
    import optuna

    client.post(f"{API}/studies", json=external_study("dash"))
    number = asked(client, "dash")["number"]
    study = optuna.load_study(study_name="dash", storage=client.app.state.db.optuna)  # type: ignore[attr-defined]
    trial_id = study.trials[number]._trial_id
    response = client.post(f"/api/trials/{trial_id}/tell", json={"state": "Complete", "values": [1.0, 2.0]})
    assert response.status_code == 422 and error_code(response) == "wrong_number_of_values"


# ---- outages and the OpenAPI document --------------------------------------------------------


def test_a_database_outage_answers_503_with_retry_after(tmp_path: Path) -> None:
    unreachable = (
        "postgresql+psycopg://postgres@127.0.0.1:9/none?connect_timeout=2"
        if os.environ.get("CAVIAR_TEST_DATABASE", "sqlite").startswith("postgresql")
        else f"sqlite:///{tmp_path}/missing-dir/x.db"
    )
    settings = Settings(database_url=unreachable, background_tasks=False, artifact_dir=str(tmp_path / "a"))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for method, path in (("GET", f"{API}/studies"), ("POST", f"{API}/studies/s/trials/ask")):
            response = client.request(method, path, json={} if method == "POST" else None)
            assert response.status_code == 503, response.text
            assert error_code(response) == "database_unavailable" and response.headers["retry-after"]


def test_the_openapi_document_declares_auth_stable_ids_and_503(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearerToken"]["description"],
    }
    operations = {
        op["operationId"]: (path, op) for path, item in schema["paths"].items() for op in item.values()
    }
    assert {"createStudy", "askTrial", "tellTrial", "reportTrial", "heartbeatWorker", "getQueue"} <= set(
        operations
    )
    assert all(op_id[0].islower() and "_" not in op_id for op_id in operations)
    for op_id, (path, op) in operations.items():
        if path.startswith(API):
            assert "503" in op["responses"], op_id


@pytest.mark.parametrize(
    ("token", "metrics_auth", "open_paths"),
    [(None, True, None), ("t" * 32, True, {"/healthz"}), ("t" * 32, False, {"/healthz", "/metrics"})],
)
def test_the_openapi_security_matches_what_the_service_enforces(
    token: str | None, metrics_auth: bool, open_paths: set[str] | None
) -> None:
    """A schema client (Schemathesis, a generated SDK) must not be told a token is needed where the
    service takes none, nor the reverse."""
    settings = Settings(
        database_url="sqlite://", background_tasks=False, api_token=token, metrics_auth=metrics_auth
    )
    schema = create_app(settings).openapi()
    if open_paths is None:
        assert "security" not in schema
        return
    assert schema["security"] == [{"bearerToken": []}, {"basicToken": []}]
    unguarded = {
        path for path, item in schema["paths"].items() for op in item.values() if op.get("security") == []
    }
    assert unguarded == open_paths
