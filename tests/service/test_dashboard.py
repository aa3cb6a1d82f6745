"""optuna-dashboard at /dashboard: routing beside /api/v1, auth, guards, a real headless browser."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

import httpx
import optuna
import pytest
import uvicorn
from fastapi.testclient import TestClient
from pydantic import SecretStr

from caviar.service.api import create_app
from caviar.service.dashboard import create_dashboard_app, is_dashboard_path
from tests.service.helpers import external_study

ADMIN = "dashboard-admin-token-0123456789"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def make_study(client: TestClient, name: str, trials: int = 3, **headers: str) -> None:
    assert client.post("/api/v1/studies", json=external_study(name), headers=headers).status_code == 201
    for i in range(trials):
        number = client.post(f"/api/v1/studies/{name}/trials/ask", json={}, headers=headers).json()["number"]
        told = client.post(
            f"/api/v1/studies/{name}/trials/{number}/tell",
            json={"state": "complete", "value": 0.5 + i / 10},
            headers=headers,
        )
        assert told.status_code == 200, told.text


@pytest.mark.parametrize(
    ("path", "dashboard"),
    [
        ("/dashboard", True),
        ("/dashboard/studies/1/trials", True),
        ("/static/bundle.js", True),
        ("/api/meta", True),
        ("/api/studies/1/note", True),
        ("/csv/1", True),
        ("/artifacts/1/2/abc", True),
        ("/favicon.ico", True),
        ("/api/v1", False),
        ("/api/v1/studies", False),
        ("/dashboardx", False),
        ("/healthz", False),
        ("/metrics", False),
        ("/", False),
    ],
)
def test_dashboard_paths(path: str, dashboard: bool) -> None:
    assert is_dashboard_path(path) is dashboard


def test_dashboard_shows_caviar_studies_beside_the_api(client: TestClient) -> None:
    make_study(client, "dash")
    page = client.get("/dashboard")
    assert page.status_code == 200 and "Optuna Dashboard" in page.text
    assert client.get("/dashboard/studies/1").status_code == 200
    assert client.get("/static/bundle.js").status_code == 200
    assert client.get("/api/meta").status_code == 200
    summaries = client.get("/api/studies").json()["study_summaries"]
    assert [s["study_name"] for s in summaries] == ["dash"]
    detail = client.get(f"/api/studies/{summaries[0]['study_id']}").json()
    assert len(detail["trials"]) == 3
    assert client.get("/api/v1/studies/dash").json()["trial_counts"]["complete"] == 3


def test_dashboard_sees_enqueued_and_imported_trials_with_metric_names(client: TestClient) -> None:
    """The dashboard reads Optuna's storage: encoded parameters, decoded user attributes, metric names."""
    body = {**external_study("seen"), "metric": "val_accuracy"}
    assert client.post("/api/v1/studies", json=body).status_code == 201
    params = {"lr": 0.01, "beta1": 0.95, "dropout": 0.25}
    items = [{"params": params, "value": 0.91}, {"params": {**params, "lr": 0.02}}]
    assert client.post("/api/v1/studies/seen/trials/enqueue", json={"trials": items}).status_code == 201
    (summary,) = client.get("/api/studies").json()["study_summaries"]
    detail = client.get(f"/api/studies/{summary['study_id']}").json()
    assert detail["objective_names"] == ["val_accuracy"]  # the charts say val_accuracy
    imported, waiting = sorted(detail["trials"], key=lambda t: t["number"])
    assert imported["state"] == "Complete" and imported["values"] == [0.91]
    shown = {p["name"]: float(p["param_external_value"]) for p in imported["params"]}
    assert set(shown) == {"lr", "one_minus_beta1", "dropout"} and abs(shown["one_minus_beta1"] - 0.05) < 1e-12
    attrs = {a["key"]: a["value"] for a in imported["user_attrs"]}
    assert float(attrs["beta1"]) == 0.95
    assert waiting["state"] == "Waiting"
    assert float({a["key"]: a["value"] for a in waiting["user_attrs"]}["beta1"]) == 0.95


def test_dashboard_cannot_delete_or_rename_caviar_studies(client: TestClient) -> None:
    make_study(client, "guarded", trials=0)
    (summary,) = client.get("/api/studies").json()["study_summaries"]
    study_id = summary["study_id"]
    deleted = client.request(
        "DELETE", f"/api/studies/{study_id}", json={"remove_associated_artifacts": False}
    )
    assert deleted.status_code == 409 and deleted.json()["error"]["code"] == "caviar_study"
    renamed = client.post(f"/api/studies/{study_id}/rename", json={"study_name": "x"})
    assert renamed.status_code == 409
    assert client.get("/api/v1/studies/guarded").status_code == 200
    created = client.post("/api/studies", json={"study_name": "plain", "directions": ["minimize"]})
    assert created.status_code == 201, created.text
    plain_id = created.json()["study_summary"]["study_id"]
    gone = client.request("DELETE", f"/api/studies/{plain_id}", json={"remove_associated_artifacts": False})
    assert gone.status_code == 204


def test_dashboard_needs_auth_and_write_scope_for_writes(settings, db) -> None:  # type: ignore[no-untyped-def]
    secured = settings.model_copy(update={"api_token": SecretStr(ADMIN)})
    with TestClient(create_app(secured, db=db)) as client:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        make_study(client, "auth", trials=1, **admin)
        tokens = {
            scope: client.post("/api/v1/tokens", json={"scope": scope}, headers=admin).json()["token"]
            for scope in ("read", "write")
        }
        challenge = client.get("/dashboard")
        assert challenge.status_code == 401
        assert challenge.headers["www-authenticate"] == 'Basic realm="caviar"'
        assert client.get("/dashboard", auth=("me", tokens["read"])).status_code == 200
        assert client.get("/api/studies", auth=("me", tokens["read"])).status_code == 200
        assert client.get("/api/studies", auth=("me", "wrong")).status_code == 401
        body = {"study_name": "from-ui", "directions": ["minimize"]}
        refused = client.post("/api/studies", json=body, auth=("me", tokens["read"]))
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        note = {"version": 1, "body": "hi"}
        assert client.put("/api/studies/1/note", json=note, auth=("me", tokens["read"])).status_code == 403
        trial_id = client.get("/api/studies/1", auth=("me", tokens["read"])).json()["trials"][0]["trial_id"]
        attrs = {"user_attrs": {"k": "v"}}
        forbidden = client.post(f"/api/trials/{trial_id}/user-attrs", json=attrs, auth=("me", tokens["read"]))
        assert forbidden.status_code == 403
        browser = {"Origin": "http://testserver"}  # a browser sends its page's origin with every write
        allowed = client.post("/api/studies", json=body, auth=("me", tokens["write"]), headers=browser)
        assert allowed.status_code == 201, allowed.text


def test_standalone_dashboard_app(settings, db) -> None:  # type: ignore[no-untyped-def]
    secured = settings.model_copy(update={"api_token": SecretStr(ADMIN)})
    with TestClient(create_dashboard_app(secured, db)) as client:
        assert client.get("/dashboard").status_code == 401
        assert client.get("/dashboard", auth=("", ADMIN)).status_code == 200
        assert client.get("/api/studies", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    with TestClient(create_dashboard_app(settings, db)) as client:
        assert client.get("/api/meta").status_code == 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def live_server(app, port: int) -> Iterator[str]:  # type: ignore[no-untyped-def]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def dump_dom(url: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                CHROMIUM,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.browser
@pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install -y chromium)"
)
def test_dashboard_renders_caviar_studies_in_a_headless_browser(settings, db) -> None:  # type: ignore[no-untyped-def]
    app = create_app(settings, db=db)
    with TestClient(app) as client:
        make_study(client, "browser-study", trials=3)
    study = optuna.load_study(study_name="browser-study", storage=db.optuna)
    trial = study.ask()
    trial.set_user_attr("origin", "browser-test")
    study.tell(trial, 0.99)
    with live_server(create_app(settings, db=db), free_port()) as base:
        assert httpx.get(f"{base}/healthz").status_code == 200
        dom = dump_dom(f"{base}/dashboard/studies/1")
        assert "browser-study" in dom
        assert "Best Trial (number=3)" in dom and "0.99" in dom
        trials_dom = dump_dom(f"{base}/dashboard/studies/1/trials")
        assert all(f"Trial {n}" in trials_dom for n in range(4))


SHOWN = {"caviar:state", "caviar:reason"}


def test_the_study_page_shows_why_caviar_paused_a_study(client: TestClient) -> None:
    """A study paused after a setup error shows its state and reason on its dashboard page (the
    study detail's user attributes, which the page lists under "Study User Attributes")."""
    assert client.post("/api/v1/studies", json=external_study("setup")).status_code == 201
    number = client.post("/api/v1/studies/setup/trials/ask", json={}).json()["number"]
    why = "setup error: python: can't open file 'trian.py'"
    told = client.post(
        f"/api/v1/studies/setup/trials/{number}/tell", json={"state": "fail", "reason": why, "fatal": True}
    )
    assert told.status_code == 200, told.text
    info = client.get("/api/v1/studies/setup").json()
    assert info["state"] == "paused" and why in info["stop_reason"]
    (summary,) = client.get("/api/studies").json()["study_summaries"]
    detail = client.get(f"/api/studies/{summary['study_id']}")
    assert detail.status_code == 200 and detail.headers["content-type"].startswith("application/json")
    assert detail.json()["user_attrs"][:2] == [
        {"key": "caviar:state", "value": "paused"},
        {"key": "caviar:reason", "value": info["stop_reason"]},
    ]
    assert len(detail.json()["trials"]) == 1  # the rest of the page is as optuna-dashboard made it
    # resumed: the reason is gone, the state says so
    assert client.post("/api/v1/studies/setup/resume").status_code == 200
    again = client.get(f"/api/studies/{summary['study_id']}?after=1").json()
    assert [a for a in again["user_attrs"] if a["key"] in SHOWN] == [
        {"key": "caviar:state", "value": client.get("/api/v1/studies/setup").json()["state"]}
    ]
    # a plain Optuna study (made from the dashboard) has no caviar rows
    created = client.post("/api/studies", json={"study_name": "plain", "directions": ["minimize"]})
    plain = client.get(f"/api/studies/{created.json()['study_summary']['study_id']}").json()
    assert not [a for a in plain["user_attrs"] if a["key"] in SHOWN]


def test_malformed_dashboard_writes_and_ids_are_4xx_never_500(client: TestClient) -> None:
    """Found by the scope fuzzer: optuna-dashboard answered each of these with a 500."""
    make_study(client, "guard", trials=2)
    (summary,) = client.get("/api/studies").json()["study_summaries"]
    study = summary["study_id"]
    finished = client.get(f"/api/studies/{study}").json()["trials"][0]["trial_id"]
    refused = [
        ("POST", "/api/studies", b"", "body"),
        ("POST", "/api/studies", b"[1]", "body"),
        ("POST", "/api/studies", b'{"study_name": 1, "directions": ["minimize"]}', "study_name"),
        ("POST", "/api/studies", b'{"study_name": "x", "directions": [1]}', "directions.0"),
        ("PUT", f"/api/studies/{study}/note", b'{"version": "1", "body": "x"}', "version"),
        ("PUT", f"/api/studies/{study}/{finished}/note", b'{"version": 1, "body": 2}', "body"),
        ("POST", f"/api/trials/{finished}/user-attrs", b'{"user_attrs": []}', "user_attrs"),
        ("POST", f"/api/artifacts/{study}", b'{"file": "not a data uri"}', "file"),
        ("POST", f"/api/artifacts/{study}", b'{"file": "data:text/plain;base64,%%%"}', "file"),
    ]
    json_type = {"Content-Type": "application/json"}
    for method, path, body, field in refused:
        answer = client.request(method, path, content=body, headers=json_type)
        assert answer.status_code == 422, (method, path, body, answer.text)
        assert answer.json()["error"]["details"] == [{"field": field}], answer.text
    # a finished trial takes no tell and no user attributes
    for path, body in (
        (f"/api/trials/{finished}/user-attrs", {"user_attrs": {"a": 1}}),
        (f"/api/trials/{finished}/tell", {"state": "Complete", "values": [1.0]}),
    ):
        answer = client.post(path, json=body)
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "trial_finished", answer.text
    # negative ids name nothing
    for method, path in (
        ("GET", "/api/studies/-1"),
        ("PUT", "/api/studies/-1/note"),
        ("GET", "/csv/-3"),
        ("POST", "/api/trials/-2/user-attrs"),
        ("POST", "/api/artifacts/-1/-1"),
    ):
        answer = client.request(method, path, json={"version": 1, "body": "x", "user_attrs": {"a": 1}})
        assert answer.status_code == 404, (method, path, answer.text)
    # server-side plots need plotly: without it, a 404 that says so
    plot = client.get(f"/api/studies/{study}/plot/slice")
    if importlib.util.find_spec("plotly") is None:
        assert plot.status_code == 404 and plot.json()["error"]["code"] == "plot_unavailable", plot.text
    else:
        assert plot.status_code == 200, plot.text
    # what the dashboard's frontend sends still goes through
    assert client.put(f"/api/studies/{study}/note", json={"version": 1, "body": "# notes"}).status_code == 204
    created = client.post("/api/studies", json={"study_name": "plain2", "directions": ["maximize"]})
    assert created.status_code == 201, created.text
