"""The access log and structured logs: fields, JSON lines, and no secret in any line.

In process (the app under ``TestClient``, records captured with caplog) and from a real
``caviar serve --processes 2 --log-format json``. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from caviar._logging import JsonFormatter, TextFormatter, record_fields
from caviar.service import processes
from caviar.service.api import create_app
from caviar.service.config import Settings
from caviar.service.db import Database
from tests.service.helpers import external_study

ADMIN = secrets.token_urlsafe(32)
WRONG = "wrong-" + secrets.token_urlsafe(24)
IN_QUERY = "q-" + secrets.token_urlsafe(24)
IN_BODY = "b-" + secrets.token_urlsafe(24)
SECRETS = (ADMIN, WRONG, IN_QUERY, IN_BODY)
API = "/api/v1"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _exercise(client: httpx.Client | TestClient) -> None:
    """Requests that put a secret in every place a log could pick one up from."""
    study = external_study("logged") | {"tags": {"note": IN_BODY}}
    assert client.post(f"{API}/studies", json=study, headers=bearer(ADMIN)).status_code == 201
    ask = client.post(f"{API}/studies/logged/trials/ask", json={"worker_id": "w1"}, headers=bearer(ADMIN))
    assert ask.status_code == 200, ask.text
    report = client.post(
        f"{API}/studies/logged/trials/0/report?token={IN_QUERY}",
        json={"step": 1, "value": 0.5},
        headers=bearer(ADMIN),
    )
    assert report.status_code == 200, report.text
    assert client.get(f"{API}/studies?token={IN_QUERY}", headers=bearer(ADMIN)).status_code == 200
    assert client.get(f"{API}/studies/logged?token={IN_QUERY}", headers=bearer(WRONG)).status_code == 401
    assert client.get(f"/no/such/{IN_QUERY}?token={IN_QUERY}").status_code in (401, 404)


def _access(entries: list[dict[str, object]], route: str) -> dict[str, object]:
    found = [e for e in entries if e.get("logger") == "caviar.access" and e.get("route") == route]
    assert found, f"no access line for {route}"
    return found[0]


def _check_access_fields(entries: list[dict[str, object]]) -> None:
    report = _access(entries, "/api/v1/studies/{name}/trials/{number}/report")
    assert (report["method"], report["status"], report["study"], report["trial"]) == (
        "POST",
        200,
        "logged",
        0,
    )
    assert isinstance(report["duration_ms"], float) and report["duration_ms"] >= 0
    assert report["level"] == "INFO" and report["message"] == "request"
    ask = _access(entries, "/api/v1/studies/{name}/trials/ask")
    assert (ask["study"], ask["status"]) == ("logged", 200) and "trial" not in ask
    listing = _access(entries, "/api/v1/studies")
    assert "study" not in listing and listing["client"]
    refused = _access(entries, "/api/v1/studies/{name}")
    assert (refused["status"], refused["study"]) == (401, "logged")
    assert _access(entries, "unmatched")["status"] in (401, 404)


@pytest.fixture
def secured_app(settings: Settings, db: Database) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"api_token": SecretStr(ADMIN)}), db=db)) as client:
        yield client


def test_access_log_in_process_has_the_fields_and_no_secret(
    secured_app: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _exercise(secured_app)
    records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]  # the test's client
    entries = [json.loads(JsonFormatter().format(r)) for r in records]
    _check_access_fields(entries)
    for record in records:
        seen = " ".join(
            [JsonFormatter().format(record), TextFormatter().format(record), repr(record_fields(record))]
        )
        for secret in SECRETS:
            assert secret not in seen, (secret, seen)


def test_a_5xx_is_logged_as_a_warning(secured_app: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="caviar.access")

    @secured_app.app.get("/boom")  # type: ignore[attr-defined]
    def boom() -> None:
        raise RuntimeError("boom")

    secured_app.app.openapi_schema = None  # type: ignore[attr-defined]
    with TestClient(secured_app.app, raise_server_exceptions=False) as client:
        assert client.get("/boom", headers=bearer(ADMIN)).status_code == 500
    (entry,) = [r for r in caplog.records if r.name == "caviar.access"]
    assert (entry.levelname, getattr(entry, "status", None)) == ("WARNING", 500)


@pytest.mark.slow
def test_real_server_json_lines_from_every_process(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    server, url = processes.serve(
        db_url,
        processes=2,
        env={"CAVIAR_API_TOKEN": ADMIN},
        log=log,
        extra=["--log-format", "json", "--log-level", "info"],
    )
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            _exercise(client)
            for _ in range(20):  # enough fresh connections that both processes answer some
                httpx.get(f"{url}/healthz", timeout=30)
    finally:
        assert server.stop() == 0
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"timestamp", "level", "logger", "message", "pid"} <= e.keys() for e in entries)
    _check_access_fields(entries)
    started = {e["pid"] for e in entries if e["message"] == "Application startup complete."}
    assert len(started) == 2  # both server processes log, in JSON
    assert any(e["message"].startswith("caviar serving on http://") for e in entries)
    text = log.read_text()
    for secret in SECRETS:
        assert secret not in text
