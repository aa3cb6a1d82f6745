"""What a browser can be made to do against the service: stored files, security headers, cross-site
writes, CORS, the dashboard's error answers and CSV exports (issue 21, parts 1, 2 and 5).

This module drives the service over HTTP only (no import of the middleware it tests), so it runs
against any version of the service.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import http.server
import io
import os
import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import optuna
import optuna_dashboard
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from caviar.service.api import create_app
from tests.service.helpers import external_study
from tests.service.test_dashboard import CHROMIUM, dump_dom, free_port, live_server

ADMIN = "web-security-admin-token-0123456789"
API = "/api/v1"
EVIL = "http://evil.example"
SELF = "http://testserver"  # the TestClient's origin
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")
SCRIPT_HTML = b"<html><body><script>fetch('/api/v1/tokens',{method:'POST'})</script></body></html>"
SCRIPT_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(document.domain)"><script>alert(1)</script></svg>'
)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(token: str) -> dict[str, str]:
    """HTTP Basic with the token as password: what a browser caches and sends by itself."""
    return {"Authorization": "Basic " + base64.b64encode(f"me:{token}".encode()).decode()}


@pytest.fixture
def secured(settings, db) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    """The service with an admin token (every request needs a token)."""
    with TestClient(create_app(settings.model_copy(update={"api_token": SecretStr(ADMIN)}), db=db)) as client:
        yield client


def token(client: TestClient, scope: str) -> str:
    made = client.post(f"{API}/tokens", json={"scope": scope}, headers=bearer(ADMIN))
    assert made.status_code == 201, made.text
    return str(made.json()["token"])


def dashboard_ids(client: TestClient, study: str) -> tuple[int, dict[int, int]]:
    """The Optuna study id of ``study`` and its trial ids by number, as the dashboard names them."""
    summaries = client.get("/api/studies", headers=bearer(ADMIN)).json()["study_summaries"]
    study_id = next(s["study_id"] for s in summaries if s["study_name"] == study)
    detail = client.get(f"/api/studies/{study_id}", headers=bearer(ADMIN)).json()
    return study_id, {t["number"]: t["trial_id"] for t in detail["trials"]}


def upload(
    client: TestClient,
    study: str,
    number: int,
    filename: str,
    body: bytes,
    auth: str,
    lease: str | None = None,
) -> str:
    """Store a file with a trial (a worker token proves the trial with its ask's credential)."""
    proof = {"X-Caviar-Lease": lease} if lease else {}
    stored = client.post(
        f"{API}/studies/{study}/trials/{number}/artifacts",
        params={"filename": filename},
        content=body,
        headers={**bearer(auth), "Content-Type": "application/octet-stream", **proof},
    )
    assert stored.status_code == 201, stored.text
    return str(stored.json()["artifact_id"])


def assert_download(response: Any) -> None:
    """A stored file answered so that no browser renders, sniffs or shares it."""
    assert response.status_code == 200, response.text
    headers = response.headers
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"].startswith("attachment")
    assert headers["x-content-type-options"] == "nosniff"
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy and "sandbox" in policy
    assert "access-control-allow-origin" not in headers


def test_stored_html_and_svg_from_a_worker_token_are_downloads_on_every_route(secured: TestClient) -> None:
    """Issue 21: a worker uploads ``.html``/``.svg`` with a script; no route serves it as a page."""
    worker, read = token(secured, "worker"), token(secured, "read")
    assert (
        secured.post(f"{API}/studies", json=external_study("xss"), headers=bearer(ADMIN)).status_code == 201
    )
    asked = secured.post(f"{API}/studies/xss/trials/ask", json={}, headers=bearer(worker)).json()
    number, lease = asked["number"], asked["credential"]
    ids = {
        name: upload(secured, "xss", number, name, body, worker, lease)
        for name, body in (("x.html", SCRIPT_HTML), ("x.svg", SCRIPT_SVG), ("checkpoint.pt", SCRIPT_HTML))
    }
    told = secured.post(
        f"{API}/studies/xss/trials/{number}/tell",
        json={"state": "complete", "value": 0.5},
        headers={**bearer(worker), "X-Caviar-Lease": lease},
    )
    assert told.status_code == 200, told.text
    study_id, trials = dashboard_ids(secured, "xss")
    data_uri = "data:text/html;base64," + base64.b64encode(SCRIPT_HTML).decode()
    study_file = secured.post(
        f"/api/artifacts/{study_id}",
        json={"file": data_uri, "filename": "study.html"},
        headers={**bearer(ADMIN), "Origin": SELF},
    )
    assert study_file.status_code == 201, study_file.text
    routes = [
        f"{API}/studies/xss/trials/{number}/artifacts/x.html",
        f"{API}/studies/xss/trials/{number}/artifacts/x.svg",
        f"{API}/studies/xss/trials/{number}/checkpoint",
        f"{API}/studies/xss/checkpoint",
        *(f"/artifacts/{study_id}/{trials[number]}/{artifact_id}" for artifact_id in ids.values()),
        f"/artifacts/{study_id}/{study_file.json()['artifact_id']}",
    ]
    for path in routes:
        for auth in (basic(read), bearer(read)):
            response = secured.get(path, headers={**auth, "Origin": EVIL})
            assert_download(response)
            assert response.content in (SCRIPT_HTML, SCRIPT_SVG), path


def test_every_answer_carries_the_security_headers(secured: TestClient) -> None:
    read = token(secured, "read")
    answers = {
        "/healthz": secured.get("/healthz"),
        "401": secured.get(f"{API}/studies"),
        "404": secured.get(f"{API}/studies/none", headers=bearer(read)),
        "json": secured.get(f"{API}/studies", headers=bearer(read)),
        "dashboard page": secured.get("/dashboard", headers=basic(read)),
        "dashboard api": secured.get("/api/studies", headers=basic(read)),
        "docs": secured.get("/docs", headers=bearer(read)),
        "openapi": secured.get("/openapi.json", headers=bearer(read)),
    }
    for what, answer in answers.items():
        assert answer.headers["x-content-type-options"] == "nosniff", what
        assert answer.headers["x-frame-options"] == "DENY", what
        assert answer.headers["referrer-policy"] in ("same-origin", "no-referrer"), what
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"], what
    page = answers["dashboard page"].headers["content-security-policy"]
    assert (
        "script-src 'self' 'unsafe-eval'" in page
    )  # optuna-dashboard's bundle and its WebGL charts still run
    assert "connect-src 'self'" in page
    assert "cdn.jsdelivr.net" in answers["docs"].headers["content-security-policy"]  # Swagger UI's bundle
    assert answers["json"].headers["content-security-policy"].startswith("default-src 'none'")


# -- cross-site writes ------------------------------------------------------------------------------


def unsafe_routes(client: TestClient) -> list[tuple[str, str]]:
    """Every state-changing (method, path template) of the service and of the dashboard inside it."""
    paths = client.get("/openapi.json", headers=bearer(ADMIN)).json()["paths"]
    found = {
        (method.upper(), path) for path, item in paths.items() for method in item if method.upper() in UNSAFE
    }
    dashboard: Any = optuna_dashboard.wsgi(storage=optuna.storages.InMemoryStorage())
    found |= {(route.method, route.rule) for route in dashboard.routes if route.method in UNSAFE}
    return sorted(found)


def fill(template: str, values: dict[str, str]) -> str:
    """A concrete path: ``{name}`` (FastAPI) and ``<name[:filter]>`` (Bottle) replaced from ``values``."""
    path = re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), "x"), template)
    return re.sub(r"<(\w+)(?::[^>]*)?>", lambda m: values.get(m.group(1), "0a0a"), path)


def snapshot(client: TestClient, study_id: int) -> dict[str, Any]:
    """Everything a forged write could change, as the API and the dashboard show it."""
    paths = [
        f"{API}/studies",
        f"{API}/studies/s/trials",
        f"{API}/studies/s/trials/0/artifacts",
        f"{API}/schedules",
        f"{API}/tokens",
        f"{API}/workers",
        "/api/studies",
        f"/api/studies/{study_id}",
    ]
    return {path: client.get(path, headers=bearer(ADMIN)).json() for path in paths}


def test_cross_site_writes_with_browser_credentials_are_refused_on_every_route(secured: TestClient) -> None:
    """Issue 21: a page on another site, riding a browser's cached Basic credentials, changes nothing."""
    admin = bearer(ADMIN)
    assert secured.post(f"{API}/studies", json=external_study("s"), headers=admin).status_code == 201
    asked = secured.post(f"{API}/studies/s/trials/ask", json={"worker_id": "w1"}, headers=admin)
    assert asked.status_code == 200, asked.text
    assert secured.post(f"{API}/studies", json=external_study("other"), headers=admin).status_code == 201
    template = {key: value for key, value in external_study("t").items() if key != "name"}
    schedule = {"name": "nightly", "cron": "0 3 * * *", "template": template}
    assert secured.post(f"{API}/schedules", json=schedule, headers=admin).status_code == 201, "schedule"
    token(secured, "read")
    token_id = str(secured.get(f"{API}/tokens", headers=admin).json()["items"][0]["id"])
    study_id, trials = dashboard_ids(secured, "s")
    values = {
        "name": "s",
        "number": "0",
        "ref": "nightly",
        "token_id": token_id,
        "worker_id": "w1",
        "study_id": str(study_id),
        "trial_id": str(trials[0]),
        "history_id": "h",
    }
    before = snapshot(secured, study_id)
    routes = unsafe_routes(secured)
    assert len(routes) >= 40  # caviar's writes and optuna-dashboard's
    assert {("POST", f"{API}/studies/{{name}}/stop"), ("PUT", "/api/studies/<study_id:int>/note")} <= set(
        routes
    )
    forged: dict[str, dict[str, Any]] = {
        "form": {"data": {"state": "complete", "value": "1", "study_name": "x"}, "headers": {"Origin": EVIL}},
        "multipart": {"files": {"file": ("x.txt", b"x")}, "headers": {"Origin": EVIL}},
        "text/plain": {
            "content": b'{"state": "complete", "value": 1}',
            "headers": {"Origin": EVIL, "Content-Type": "text/plain"},
        },
        "empty": {"headers": {"Origin": EVIL}},
        "empty, null origin": {"headers": {"Origin": "null"}},
        "empty, no origin nor referer": {"headers": {}},
        "json, evil referer": {
            "json": {"state": "complete", "value": 1},
            "headers": {"Referer": f"{EVIL}/x"},
        },
    }
    for method, template in routes:
        path = fill(template, values)
        for what, request in forged.items():
            kwargs = {**request, "headers": {**basic(ADMIN), **request["headers"]}}
            answer = secured.request(method, path, params={"filename": "x.html"}, **kwargs)
            assert answer.status_code in (403, 415), (method, path, what, answer.status_code, answer.text)
            error = answer.json()["error"]
            assert error["code"] in ("cross_site_request", "unsupported_media_type"), (method, path, what)
    assert snapshot(secured, study_id) == before
    assert secured.get(f"{API}/studies/s", headers=admin).json()["state"] == "running"


def test_bearer_clients_and_same_origin_pages_still_write(secured: TestClient) -> None:
    admin = bearer(ADMIN)
    created = secured.post(f"{API}/studies", json=external_study("ok"), headers=admin)  # no Origin: a script
    assert created.status_code == 201, created.text
    assert secured.post(f"{API}/studies/ok/pause", headers=admin).status_code == 200  # empty body, no type
    page = {**basic(ADMIN), "Origin": SELF}
    assert secured.post(f"{API}/studies/ok/resume", headers=page).status_code == 200
    referred = {**basic(ADMIN), "Referer": f"{SELF}/dashboard/studies/1"}
    assert secured.post(f"{API}/studies/ok/pause", headers=referred).status_code == 200
    assert secured.get(f"{API}/studies/ok", headers=admin).json()["state"] == "paused"
    edited = secured.patch(f"{API}/studies/ok", json={"priority": 5}, headers=page)  # same-origin JSON
    assert edited.status_code == 200 and edited.json()["definition"]["priority"] == 5, edited.text
    study_id, _ = dashboard_ids(secured, "ok")
    note = secured.put(f"/api/studies/{study_id}/note", json={"version": 1, "body": "hi"}, headers=page)
    assert note.status_code == 204, note.text  # the dashboard's own JSON writes keep working
    refused = secured.post(f"{API}/studies/ok/resume", headers={**admin, "Origin": EVIL})
    assert refused.status_code == 403  # a Bearer token sent from another site's page: still refused


def test_cross_site_writes_are_refused_without_a_token_too(client: TestClient) -> None:
    """With no token (loopback), any page the operator visits could otherwise stop a study."""
    assert client.post(f"{API}/studies", json=external_study("open")).status_code == 201
    assert client.post(f"{API}/studies/open/stop", headers={"Origin": EVIL}).status_code == 403
    form = client.post(f"{API}/studies/open/stop", data={"a": "b"})
    assert form.status_code == 415 and form.json()["error"]["code"] == "unsupported_media_type"
    assert client.get(f"{API}/studies/open").json()["state"] == "queued"
    assert client.post(f"{API}/studies/open/pause").status_code == 200  # curl, the SDK: no Origin


def test_cors_answers_only_configured_origins(settings, db) -> None:  # type: ignore[no-untyped-def]
    configured = settings.model_copy(
        update={"api_token": SecretStr(ADMIN), "cors_origins": ["https://ui.example"]}
    )
    with TestClient(create_app(configured, db=db)) as client:
        created = client.post(f"{API}/studies", json=external_study("c"), headers=bearer(ADMIN))
        assert created.status_code == 201
        study_id, _ = dashboard_ids(client, "c")
        for path in (f"{API}/studies", "/api/studies", f"/api/studies/{study_id}"):
            unknown = client.get(path, headers={**bearer(ADMIN), "Origin": EVIL})
            assert "access-control-allow-origin" not in unknown.headers, path
            known = client.get(path, headers={**bearer(ADMIN), "Origin": "https://ui.example"})
            assert known.headers["access-control-allow-origin"] == "https://ui.example", path
        paused = client.post(
            f"{API}/studies/c/pause", headers={**bearer(ADMIN), "Origin": "https://ui.example"}
        )
        assert paused.status_code == 200  # a configured origin may write
        evil = client.post(f"{API}/studies/c/resume", headers={**bearer(ADMIN), "Origin": EVIL})
        assert evil.status_code == 403


# -- the dashboard's 500s ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/artifacts/999999/1/abc"),
        ("GET", "/artifacts/999999/abc"),
        ("GET", "/artifacts/1/999999/abc"),
        ("GET", "/artifacts/1/abc"),
        ("GET", "/artifacts/1/0/abc"),
        ("GET", "/api/studies/999999/plot/history"),
        ("GET", "/api/studies/99999999999/plot/history"),
        ("GET", "/api/studies/999999/param_importances"),
        ("GET", "/csv/999999"),
        ("DELETE", "/api/studies/999999"),
        ("DELETE", "/api/artifacts/999999/1/abc"),
        ("DELETE", "/api/artifacts/1/999999/abc"),
        ("POST", "/api/artifacts/1/999999"),
        ("POST", "/api/trials/999999/user-attrs"),
        ("PUT", "/api/studies/1/999999/note"),
    ],
)
def test_the_dashboard_answers_404_for_what_does_not_exist(
    secured: TestClient, method: str, path: str
) -> None:
    assert secured.post(f"{API}/studies", json=external_study("d"), headers=bearer(ADMIN)).status_code == 201
    secured.post(f"{API}/studies/d/trials/ask", json={}, headers=bearer(ADMIN))
    write = token(secured, "write")
    answer = secured.request(method, path, json={"user_attrs": {}}, headers={**basic(write), "Origin": SELF})
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"].endswith("not_found")


def test_the_dashboards_client_side_routes_are_its_page_not_errors(secured: TestClient) -> None:
    read = token(secured, "read")
    page = secured.get("/dashboard/artifacts/999999/1/abc", headers=basic(read))
    assert page.status_code == 200 and "Optuna Dashboard" in page.text


# -- CSV exports ------------------------------------------------------------------------------------

FORMULAS = ['=HYPERLINK("http://evil.example","x")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\tx", "\rx"]


def csv_cells(text: str) -> list[str]:
    return [cell for row in csv.reader(io.StringIO(text, newline="")) for cell in row]


def test_csv_exports_escape_formula_cells(client: TestClient) -> None:
    """A choice or worker id that a spreadsheet would run as a formula is exported with a ``'`` in front."""
    body = external_study("csv")
    body["search_space"] = {
        "choice": {"type": "categorical", "choices": FORMULAS},
        "x": {"type": "float", "low": -2, "high": -1},
    }
    assert client.post(f"{API}/studies", json=body).status_code == 201, "study"
    items = [{"params": {"choice": choice, "x": -1.5}, "value": -0.5} for choice in FORMULAS]
    assert client.post(f"{API}/studies/csv/trials/enqueue", json={"trials": items}).status_code == 201
    asked = client.post(f"{API}/studies/csv/trials/ask", json={"worker_id": "@worker"})
    assert asked.status_code == 200, asked.text
    api = client.get(f"{API}/studies/csv/trials/export")
    study_id, _ = dashboard_ids(client, "csv")
    dashboard = client.get(f"/csv/{study_id}")
    for export in (api, dashboard):
        assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
        assert export.headers["content-disposition"].startswith("attachment")
        cells = csv_cells(export.text)
        for formula in FORMULAS:
            assert formula not in cells and f"'{formula}" in cells, formula
        assert not any(cell.startswith(("=", "+", "@", "\t", "\r")) for cell in cells)
        assert "-0.5" in cells and "-1.5" in cells  # numbers stay numbers
    assert "'@worker" in csv_cells(api.text)


# -- a real browser ---------------------------------------------------------------------------------

EVIL_PAGE = """<!DOCTYPE html><html><body><p id="done">no</p>
<script>
const send = (path, init) => fetch("{base}/api/v1/studies/victim/" + path,
  {{method: "POST", mode: "no-cors", credentials: "include", ...init}}).catch(() => null);
send("pause", {{}})
  .then(() => send("stop", {{body: "a=b", headers: {{"Content-Type": "application/x-www-form-urlencoded"}}}}))
  .then(() => send("trials/ask", {{body: '{{"worker_id": "evil"}}'}}))
  .then(() => {{ document.getElementById("done").textContent = "sent"; }});
</script></body></html>"""


@contextlib.contextmanager
def page_server(html: str) -> Iterator[str]:
    """Another origin (another port) serving one page: the attacker's site."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.mark.browser
@pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install -y chromium)"
)
def test_a_page_on_another_site_cannot_steer_a_study_in_a_real_browser(settings, db) -> None:  # type: ignore[no-untyped-def]
    """Headless Chromium opens an attacker's page that posts a form and no-cors fetches to the service."""
    with live_server(create_app(settings, db=db), free_port()) as base:
        assert httpx.post(f"{base}{API}/studies", json=external_study("victim")).status_code == 201
        with page_server(EVIL_PAGE.format(base=base)) as evil:
            assert '<p id="done">sent</p>' in dump_dom(evil)  # the browser sent all three
        study = httpx.get(f"{base}{API}/studies/victim").json()
        assert study["state"] == "queued", study["state"]  # not paused, not stopped, no trial claimed
        assert study["trial_counts"]["running"] == 0
