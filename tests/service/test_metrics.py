"""GET /metrics: Prometheus text format, route-template latency, errors, state gauges from the DB."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from starlette.routing import Route

from caviar.service.api import create_app
from caviar.service.metrics import MULTIPROC_ENV, RequestMiddleware, prepare_multiprocess
from caviar.storage import Schedule, ScheduleRun, StudyRecord, TrialLease, WorkerRecord, utcnow
from tests.service.helpers import external_study

ROOT = Path(__file__).resolve().parents[2]


def scrape(client: TestClient, **kwargs) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # type: ignore[no-untyped-def]
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    return float(samples.get((name, tuple(sorted(labels.items()))), 0.0))


def test_state_gauges_come_from_the_database(client: TestClient, db) -> None:  # type: ignore[no-untyped-def]
    assert client.post("/api/v1/studies", json=external_study("m1", n_trials=5)).status_code == 201
    assert client.post("/api/v1/studies", json=external_study("m2")).status_code == 201
    for _ in range(2):
        number = client.post("/api/v1/studies/m1/trials/ask", json={}).json()["number"]
    client.post(f"/api/v1/studies/m1/trials/{number}/tell", json={"state": "complete", "value": 1.0})
    now = utcnow()
    with db.session() as session:
        study_id = session.query(StudyRecord.id).filter_by(name="m2").scalar()
        session.add_all(
            [
                WorkerRecord(id="live", host="h", pid=1, device="cpu", last_seen_at=now),
                WorkerRecord(id="gone", host="h", pid=2, device="cpu", last_seen_at=now - timedelta(hours=1)),
                TrialLease(trial_id=10_000, study_id=study_id, number=99, status="reaped", expires_at=now),
                Schedule(name="nightly", cron="0 3 * * *", template={}),
            ]
        )
        session.flush()
        schedule_id = session.query(Schedule.id).scalar()
        session.add_all(
            [
                ScheduleRun(schedule_id=schedule_id, tick_at=now, outcome="created"),
                ScheduleRun(schedule_id=schedule_id, tick_at=now - timedelta(days=1), outcome="created"),
                ScheduleRun(schedule_id=schedule_id, tick_at=now - timedelta(days=2), outcome="skipped"),
            ]
        )
        session.commit()
    samples = scrape(client)
    assert value(samples, "caviar_database_up") == 1
    assert value(samples, "caviar_studies", state="running") == 1
    assert value(samples, "caviar_studies", state="queued") == 1
    assert value(samples, "caviar_studies", state="failed") == 0
    assert value(samples, "caviar_trials", state="running") == 1
    assert value(samples, "caviar_trials", state="complete") == 1
    assert value(samples, "caviar_workers_live") == 1
    assert value(samples, "caviar_trial_leases", status="reaped") == 1
    assert value(samples, "caviar_trial_leases", status="active") == 1
    assert value(samples, "caviar_trial_leases", status="finished") == 1
    assert value(samples, "caviar_schedule_runs", outcome="created") == 2
    assert value(samples, "caviar_schedule_runs", outcome="skipped") == 1


def test_request_latency_by_route_template_and_errors_by_status(client: TestClient) -> None:
    before = scrape(client)
    assert client.post("/api/v1/studies", json=external_study("lat")).status_code == 201
    number = client.post("/api/v1/studies/lat/trials/ask", json={}).json()["number"]
    client.post(f"/api/v1/studies/lat/trials/{number}/report", json={"step": 1, "value": 0.3})
    client.post(f"/api/v1/studies/lat/trials/{number}/tell", json={"state": "complete", "value": 0.3})
    assert client.get("/api/v1/studies/nope").status_code == 404
    assert client.get("/no/such/path").status_code == 404
    client.get("/dashboard")
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    count = "caviar_http_request_duration_seconds_count"
    for route in ("ask", "{number}/report", "{number}/tell"):
        assert delta(count, method="POST", route=f"/api/v1/studies/{{name}}/trials/{route}") == 1
    assert delta(count, method="GET", route="/api/v1/studies/{name}") == 1
    assert delta(count, method="GET", route="dashboard") == 1
    assert delta(count, method="GET", route="unmatched") == 1
    assert delta("caviar_http_errors_total", route="/api/v1/studies/{name}", status="404") == 1
    assert delta("caviar_http_errors_total", route="unmatched", status="404") == 1
    assert not any("lat" in dict(labels).get("route", "") for _, labels in after)
    # the templates come from the app's routes: labelling requests never builds the OpenAPI schema
    assert client.app.openapi_schema is None  # type: ignore[attr-defined]


def test_every_route_of_the_app_has_its_template_in_routing_order(client: TestClient) -> None:
    """The labels are read from the routers create_app includes, not from the app's routes (which
    would build them all): a route added another way would be labelled ``unmatched``."""
    middleware = next(m for m in client.app.user_middleware if m.cls is RequestMiddleware)  # type: ignore[attr-defined]
    routed = [
        c.path_format for c in iter_route_contexts(client.app.routes) if isinstance(c.original_route, Route)
    ]
    assert list(dict.fromkeys(middleware.kwargs["templates"])) == list(dict.fromkeys(routed))


def test_metrics_need_read_scope_by_default_and_can_be_opened(settings, db) -> None:  # type: ignore[no-untyped-def]
    closed = settings.model_copy(update={"api_token": SecretStr("t" * 32)})
    with TestClient(create_app(closed, db=db)) as client:
        assert client.get("/metrics").status_code == 401
        assert scrape(client, headers={"Authorization": "Bearer " + "t" * 32})
    opened = settings.model_copy(update={"api_token": SecretStr("t" * 32), "metrics_auth": False})
    with TestClient(create_app(opened, db=db)) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/api/v1/studies").status_code == 401


def test_prepare_multiprocess_sets_a_folder_only_for_several_processes(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(MULTIPROC_ENV, "")  # restored (removed) after the test
    prepare_multiprocess(1)
    assert os.environ[MULTIPROC_ENV] == ""
    prepare_multiprocess(3)
    assert Path(os.environ[MULTIPROC_ENV]).is_dir()
    folder = os.environ[MULTIPROC_ENV]
    prepare_multiprocess(3)
    assert os.environ[MULTIPROC_ENV] == folder


def test_multiprocess_mode_sums_request_metrics_over_processes(tmp_path: Path, db_url: str) -> None:
    """Two 'server processes' record requests; a third answers the scrape with their sum."""
    record = textwrap.dedent(
        f"""
        from fastapi.testclient import TestClient
        from caviar.service.api import create_app
        from caviar.service.config import Settings
        with TestClient(create_app(Settings(database_url={db_url!r}))) as client:
            assert client.get("/api/v1/studies").status_code == 200
        """
    )
    scrape_code = textwrap.dedent(
        f"""
        from caviar.service.db import Database
        from caviar.service.metrics import render
        print(render(Database({db_url!r}), 60.0).decode())
        """
    )
    env = {**os.environ, MULTIPROC_ENV: str(tmp_path)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", record], env=env, cwd=ROOT, check=True, timeout=120)
    out = subprocess.run(
        [sys.executable, "-c", scrape_code],
        env=env,
        cwd=ROOT,
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    ).stdout
    line = 'caviar_http_request_duration_seconds_count{method="GET",route="/api/v1/studies"} 2.0'
    assert line in out
    assert "caviar_studies" in out
