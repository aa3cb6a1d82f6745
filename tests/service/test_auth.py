"""Tokens, scopes and secure defaults: 401/403 in the envelope, hashed storage, body cap, CORS."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select, update

import caviar
from caviar.service.api import create_app
from caviar.service.auth import MAX_TOKEN_CHARS, TokenVerifier, allows, credentials, required_scope
from caviar.service.security import OPEN_PATHS
from caviar.service.tokens import service as tokens
from caviar.storage import ApiToken
from tests.service.helpers import external_study

ADMIN = "admin-" + "s3cr3t-" * 4
API = "/api/v1"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def secured(settings, db) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    secured_settings = settings.model_copy(update={"api_token": SecretStr(ADMIN)})
    with TestClient(create_app(secured_settings, db=db)) as client:
        yield client


def make_token(client: TestClient, scope: str, name: str | None = None) -> str:
    body = {"scope": scope} | ({"name": name} if name else {})
    response = client.post(f"{API}/tokens", json=body, headers=bearer(ADMIN))
    assert response.status_code == 201, response.text
    token = response.json()["token"]
    assert token.startswith("cvr_") and len(token) >= 40
    return str(token)


def assert_envelope(response, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and isinstance(error["details"], list)


def test_without_a_token_configured_everything_is_open(client: TestClient) -> None:
    assert client.get(f"{API}/studies").status_code == 200
    assert client.post(f"{API}/tokens", json={"scope": "read"}).status_code == 201
    assert client.get("/dashboard").status_code == 200


def test_missing_and_invalid_tokens_get_401_with_a_challenge(secured: TestClient) -> None:
    response = secured.get(f"{API}/studies")
    assert_envelope(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == 'Bearer realm="caviar"'
    for header in ("Bearer nope", "Bearer " + ADMIN + "x", "Token " + ADMIN, "Basic !!!", "Bearer"):
        response = secured.get(f"{API}/studies", headers={"Authorization": header})
        assert_envelope(response, 401, "unauthorized")
        assert ADMIN not in response.text and "nope" not in response.text
    dashboard = secured.get("/dashboard/studies/1")
    assert_envelope(dashboard, 401, "unauthorized")
    assert dashboard.headers["www-authenticate"] == 'Basic realm="caviar"'


def test_only_healthz_is_open(secured: TestClient) -> None:
    assert secured.get("/healthz").status_code == 200
    for path in (
        "/metrics",
        "/openapi.json",
        "/docs",
        "/dashboard",
        "/api/meta",
        "/static/bundle.js",
        "/nowhere",
    ):
        assert secured.get(path).status_code == 401, path


def test_every_documented_operation_needs_a_token(secured: TestClient) -> None:
    """Covers routers added by anyone: the policy is global, not per route."""
    schema = secured.get("/openapi.json", headers=bearer(ADMIN)).json()
    checked = 0
    for template, operations in schema["paths"].items():
        path = re.sub(r"\{[^}]+\}", "1", template)
        for method in operations:
            response = secured.request(method.upper(), path)
            if path in OPEN_PATHS:
                assert response.status_code != 401
                continue
            assert_envelope(response, 401, "unauthorized")
            checked += 1
    assert checked >= 15


def test_admin_token_is_accepted_as_bearer_and_basic(secured: TestClient) -> None:
    assert secured.get(f"{API}/studies", headers=bearer(ADMIN)).status_code == 200
    assert secured.get(f"{API}/studies", auth=("anyone", ADMIN)).status_code == 200
    assert secured.get("/dashboard", auth=("", ADMIN)).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "needed"),
    [
        ("GET", "/api/v1/studies", "read"),
        ("HEAD", "/api/v1/studies/s", "read"),
        ("GET", "/api/v1/schedules/3/runs", "read"),
        ("GET", "/dashboard/studies/1", "read"),
        ("GET", "/api/studies/1", "read"),
        ("POST", "/api/v1/studies/s/trials/ask", "worker"),
        ("POST", "/api/v1/studies/s/trials/4/report", "worker"),
        ("POST", "/api/v1/studies/s/trials/4/heartbeat", "worker"),
        ("POST", "/api/v1/studies/s/trials/4/tell", "worker"),
        ("POST", "/api/v1/studies", "write"),
        ("POST", "/api/v1/studies/s/pause", "write"),
        ("POST", "/api/v1/studies/s/refine", "write"),
        ("PATCH", "/api/v1/studies/s", "write"),
        ("POST", "/api/v1/studies/s/stop", "write"),
        ("POST", "/api/v1/studies/s/resume", "write"),
        ("POST", "/api/v1/studies/s/trials/enqueue", "write"),
        ("GET", "/api/v1/studies/s/trials/export", "read"),
        ("DELETE", "/api/v1/studies/s", "write"),
        ("POST", "/api/v1/studies/s/trials/4/tell/extra", "write"),
        ("PUT", "/api/v1/studies/s/trials/ask", "write"),
        ("PATCH", "/api/v1/schedules/1", "write"),
        ("POST", "/api/studies", "write"),
        ("PUT", "/api/studies/1/note", "write"),
        ("DELETE", "/api/artifacts/1/2", "write"),
        ("GET", "/api/v1/tokens", "admin"),
        ("POST", "/api/v1/tokens", "admin"),
        ("DELETE", "/api/v1/tokens/1", "admin"),
        ("GET", "/healthz", None),
    ],
)
def test_required_scope(method: str, path: str, needed: str | None) -> None:
    assert required_scope(method, path, OPEN_PATHS) == needed


def test_scopes_are_ordered() -> None:
    assert allows("admin", "admin") and allows("admin", "write") and allows("write", "worker")
    assert allows("worker", "read") and allows("read", "read")
    assert not allows("write", "admin") and not allows("worker", "write") and not allows("read", "worker")
    assert not allows("bogus", "read")


def test_credentials_parsing() -> None:
    assert credentials("Bearer abc") == "abc"
    assert credentials("bearer   abc ") == "abc"
    assert credentials("Basic dXNlcjpwdw==") == "pw"  # user:pw
    assert credentials("Basic dG9rZW4=") == "token"  # a token typed as the user name
    assert credentials(None) is None and credentials("") is None and credentials("Digest x") is None
    # only the first colon separates the user: a password (a static token) may hold colons
    assert credentials("Basic " + base64.b64encode(b"user:to:ken").decode()) == "to:ken"
    # strict base64: characters outside the alphabet refuse the header rather than being dropped
    assert credentials("Basic dXNlcjp*wdw==") is None and credentials("Basic dXNl cjpwdw==") is None


def test_a_token_of_the_maximum_length_is_accepted_longer_ones_are_not(settings, db) -> None:  # type: ignore[no-untyped-def]
    for length, status in ((MAX_TOKEN_CHARS, 200), (MAX_TOKEN_CHARS + 1, 401)):
        token = "t" * length
        secured_settings = settings.model_copy(update={"api_token": SecretStr(token)})
        with TestClient(create_app(secured_settings, db=db)) as client:
            assert client.get(f"{API}/studies", headers=bearer(token)).status_code == status


def test_scope_matrix_over_the_real_api(secured: TestClient) -> None:
    read, worker, write = (make_token(secured, scope) for scope in ("read", "worker", "write"))
    admin = make_token(secured, "admin", name="second admin")
    assert secured.post(f"{API}/studies", json=external_study("m"), headers=bearer(write)).status_code == 201

    assert secured.get(f"{API}/studies/m", headers=bearer(read)).status_code == 200
    assert_envelope(
        secured.post(f"{API}/studies", json=external_study("x"), headers=bearer(read)), 403, "forbidden"
    )
    assert_envelope(
        secured.post(f"{API}/studies/m/trials/ask", json={}, headers=bearer(read)), 403, "forbidden"
    )

    assignment = secured.post(f"{API}/studies/m/trials/ask", json={"worker_id": "w"}, headers=bearer(worker))
    assert assignment.status_code == 200, assignment.text
    number = assignment.json()["number"]
    trial = f"{API}/studies/m/trials/{number}"
    own = {"worker_id": "w"}
    holder = bearer(worker) | {"X-Caviar-Lease": assignment.json()["credential"]}
    report = {"step": 0, "value": 0.5}
    assert secured.post(f"{trial}/report", json=report | own, headers=holder).status_code == 200
    assert secured.post(f"{trial}/heartbeat", json=own, headers=holder).status_code == 204
    # a trial belongs to the credential that claimed it: without it, any worker id (its own
    # included: a label, not proof) is refused ...
    for other in ({}, {"worker_id": "intruder"}, own):
        for action, body in (
            ("report", report),
            ("heartbeat", {}),
            ("tell", {"state": "fail"}),
            ("release", {}),
        ):
            refused = secured.post(f"{trial}/{action}", json=body | other, headers=bearer(worker))
            assert_envelope(refused, 409, "not_your_trial")
    # ... unless the caller holds write scope
    assert (
        secured.post(f"{trial}/report", json={"step": 1, "value": 0.6}, headers=bearer(write)).status_code
        == 200
    )
    told = secured.post(f"{trial}/tell", json={"state": "complete", "value": 0.9} | own, headers=holder)
    assert told.status_code == 200, told.text
    assert_envelope(secured.post(f"{API}/studies/m/pause", headers=bearer(worker)), 403, "forbidden")
    assert_envelope(secured.delete(f"{API}/studies/m", headers=bearer(worker)), 403, "forbidden")
    assert_envelope(secured.get(f"{API}/tokens", headers=bearer(worker)), 403, "forbidden")

    assert secured.post(f"{API}/studies/m/pause", headers=bearer(write)).status_code == 200
    assert_envelope(secured.get(f"{API}/tokens", headers=bearer(write)), 403, "forbidden")
    forbidden = secured.post(f"{API}/tokens", json={"scope": "admin"}, headers=bearer(write))
    assert_envelope(forbidden, 403, "forbidden")
    assert write not in forbidden.text
    assert forbidden.json()["error"]["details"] == [{"scope": "write", "required": "admin"}]

    assert secured.get(f"{API}/tokens", headers=bearer(admin)).status_code == 200
    assert secured.delete(f"{API}/studies/m", headers=bearer(admin)).status_code == 204


def test_tokens_are_stored_hashed_and_listed_without_secrets(secured: TestClient, db) -> None:  # type: ignore[no-untyped-def]
    token = make_token(secured, "read", name="ci reader")
    listed = secured.get(f"{API}/tokens", headers=bearer(ADMIN))
    assert listed.status_code == 200
    assert token not in listed.text and token[12:] not in listed.text
    (item,) = listed.json()["items"]
    assert item["name"] == "ci reader" and item["scope"] == "read" and "token" not in item
    assert token.startswith(item["prefix"])
    with db.session() as session:
        row = session.scalars(select(ApiToken)).one()
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    stored = " ".join(str(getattr(row, column.key)) for column in ApiToken.__table__.columns)
    assert token not in stored and token[12:] not in stored


def test_last_used_is_recorded(secured: TestClient) -> None:
    token = make_token(secured, "read")
    assert secured.get(f"{API}/studies", headers=bearer(token)).status_code == 200
    (item,) = secured.get(f"{API}/tokens", headers=bearer(ADMIN)).json()["items"]
    assert item["last_used_at"] is not None


def test_revoked_tokens_are_refused_at_once(secured: TestClient) -> None:
    token = make_token(secured, "write")
    assert secured.get(f"{API}/studies", headers=bearer(token)).status_code == 200  # now cached
    (item,) = secured.get(f"{API}/tokens", headers=bearer(ADMIN)).json()["items"]
    assert secured.delete(f"{API}/tokens/{item['id']}", headers=bearer(ADMIN)).status_code == 204
    assert_envelope(secured.get(f"{API}/studies", headers=bearer(token)), 401, "unauthorized")
    assert secured.delete(f"{API}/tokens/{item['id']}", headers=bearer(ADMIN)).status_code == 204
    assert secured.get(f"{API}/tokens", headers=bearer(ADMIN)).json()["total"] == 0
    assert secured.get(f"{API}/tokens?include_revoked=true", headers=bearer(ADMIN)).json()["total"] == 1
    assert_envelope(secured.delete(f"{API}/tokens/999", headers=bearer(ADMIN)), 404, "token_not_found")


def test_token_requests_are_validated(secured: TestClient) -> None:
    for body in ({"scope": "root"}, {}, {"scope": "read", "name": "x" * 101}, {"scope": "read", "extra": 1}):
        assert_envelope(
            secured.post(f"{API}/tokens", json=body, headers=bearer(ADMIN)), 422, "validation_error"
        )


def test_secrets_never_reach_the_logs(secured: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = make_token(secured, "read")
    secured.get(f"{API}/studies", headers=bearer(token))
    secured.get(f"{API}/studies", headers=bearer(token + "x"))
    secured.post(f"{API}/studies", json={}, headers=bearer(token))
    assert token not in caplog.text and ADMIN not in caplog.text


def test_body_cap_by_content_length_and_by_streamed_bytes(settings, db) -> None:  # type: ignore[no-untyped-def]
    small = settings.model_copy(update={"max_body_bytes": 4096})
    with TestClient(create_app(small, db=db)) as client:
        assert_envelope(client.post(f"{API}/studies", content=b"x" * 5000), 413, "payload_too_large")

        def chunks() -> Iterator[bytes]:
            for _ in range(10):
                yield b"x" * 1000

        assert_envelope(client.post(f"{API}/studies", content=chunks()), 413, "payload_too_large")
        assert_envelope(client.post("/api/studies", content=b"{" * 5000), 413, "payload_too_large")
        ok = client.post(f"{API}/studies", json=external_study("fits"))
        assert ok.status_code == 201, ok.text
        bad = client.post(f"{API}/studies", content=b"{}", headers={"Content-Length": "x"})
        assert bad.status_code == 400


def test_cors_is_off_by_default_and_on_for_configured_origins(settings, db, client: TestClient) -> None:  # type: ignore[no-untyped-def]
    headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.get(f"{API}/studies", headers=headers).headers
    allowed = settings.model_copy(
        update={"cors_origins": ["https://ui.example"], "api_token": SecretStr(ADMIN)}
    )
    with TestClient(create_app(allowed, db=db)) as cors_client:
        preflight = cors_client.options(
            f"{API}/studies",
            headers={
                "Origin": "https://ui.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
        other = cors_client.get(f"{API}/studies", headers={"Origin": "https://evil.example", **bearer(ADMIN)})
        assert "access-control-allow-origin" not in other.headers


def test_a_root_path_prefix_does_not_dodge_the_policy(settings, db) -> None:  # type: ignore[no-untyped-def]
    secured = settings.model_copy(update={"api_token": SecretStr(ADMIN)})
    with TestClient(create_app(secured, db=db), root_path="/caviar") as client:
        write = make_token(client, "write")
        assert client.get("/caviar/api/v1/studies", headers=bearer(write)).status_code == 200
        assert_envelope(client.get("/caviar/api/v1/tokens", headers=bearer(write)), 403, "forbidden")
        assert_envelope(client.get("/caviar/healthz/../api/v1/tokens"), 401, "unauthorized")


def test_a_revocation_reaches_another_server_process_within_the_documented_delay(settings, db) -> None:  # type: ignore[no-untyped-def]
    """Two servers on one database (each with its own token cache, as two `caviar serve` processes
    have): a token revoked through one is refused by the other within CACHE_TTL_S (docs/security.md: 5 s)."""
    import time

    from caviar.service.auth import CACHE_TTL_S

    assert CACHE_TTL_S <= 5.0  # the documented bound
    secured_settings = settings.model_copy(update={"api_token": SecretStr(ADMIN)})
    with (
        TestClient(create_app(secured_settings, db=db)) as first,
        TestClient(create_app(secured_settings, db=db)) as other,
    ):
        token = make_token(first, "write")
        assert other.get(f"{API}/studies", headers=bearer(token)).status_code == 200  # cached there now
        (item,) = first.get(f"{API}/tokens", headers=bearer(ADMIN)).json()["items"]
        assert first.delete(f"{API}/tokens/{item['id']}", headers=bearer(ADMIN)).status_code == 204
        revoked = time.monotonic()
        assert_envelope(first.get(f"{API}/studies", headers=bearer(token)), 401, "unauthorized")  # at once
        while other.get(f"{API}/studies", headers=bearer(token)).status_code == 200:
            assert time.monotonic() - revoked < CACHE_TTL_S + 1.0, "the other process still accepts the token"
            time.sleep(0.1)
        assert_envelope(other.get(f"{API}/studies", headers=bearer(token)), 401, "unauthorized")
        # and it stays refused (a refusal is not cached as a pass later)
        assert (
            other.post(f"{API}/studies", json=external_study("late"), headers=bearer(token)).status_code
            == 401
        )


# ---- found by mutation testing (docs/mutation-testing.md) ---------------------------------


def test_the_worker_token_has_worker_scope(db) -> None:  # type: ignore[no-untyped-def]
    verifier = TokenVerifier(SecretStr(ADMIN), db, worker_token=SecretStr("worker-" + "w" * 20))
    assert verifier.verify("worker-" + "w" * 20) == "worker"
    assert verifier.verify("worker-" + "w" * 21) is None
    assert verifier.verify(ADMIN) == "admin"
    assert TokenVerifier(SecretStr(ADMIN), db).verify("worker-" + "w" * 20) is None


def test_verified_tokens_are_cached_for_the_ttl(db) -> None:  # type: ignore[no-untyped-def]
    verifier = TokenVerifier(SecretStr(ADMIN), db, ttl_s=3600)
    created = tokens.create_token(db, "write")
    assert verifier.cached(created.token) is None  # not verified yet
    assert verifier.verify(created.token) == "write"
    assert verifier.cached(created.token) == "write"
    tokens.revoke_token(db, created.id)  # in another process: this verifier is not told
    assert verifier.verify(created.token) == "write"  # within the TTL, from the cache
    verifier.forget()
    assert verifier.cached(created.token) is None
    assert verifier.verify(created.token) is None


def test_last_used_is_written_at_most_once_per_resolution(db) -> None:  # type: ignore[no-untyped-def]
    verifier = TokenVerifier(SecretStr(ADMIN), db, ttl_s=0)  # every verify asks the database
    created = tokens.create_token(db, "read")
    assert verifier.verify(created.token) == "read"
    first = tokens.lookup_scope(db, created.token)
    assert first is not None and first[2] is not None
    with db.session() as session:  # a recognisable old value: a touch would overwrite it
        session.execute(update(ApiToken).values(last_used_at=first[2] - timedelta(hours=1)))
        session.commit()
    assert verifier.verify(created.token) == "read"
    again = tokens.lookup_scope(db, created.token)
    assert again is not None and again[2] == first[2] - timedelta(hours=1)


def test_list_tokens_leaves_revoked_ones_out_by_default(db) -> None:  # type: ignore[no-untyped-def]
    kept = tokens.create_token(db, "read", name="kept")
    gone = tokens.create_token(db, "read", name="gone")
    tokens.revoke_token(db, gone.id)
    assert [t.name for t in tokens.list_tokens(db).items] == ["kept"]
    assert [t.id for t in tokens.list_tokens(db, include_revoked=True).items] == [kept.id, gone.id]


def test_401_messages_and_challenge_of_the_api_root(secured: TestClient) -> None:
    missing = secured.get(API)
    assert_envelope(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == 'Bearer realm="caviar"'
    assert missing.json()["error"]["message"] == "authentication required: send Authorization: Bearer <token>"
    invalid = secured.get(f"{API}/studies", headers=bearer("nope"))
    assert invalid.json()["error"]["message"] == "invalid or revoked token"


@pytest.mark.parametrize(
    ("scope", "satisfied"),
    [
        ("read", ["read"]),
        ("worker", ["read", "worker"]),
        ("write", ["read", "worker", "write"]),
        ("admin", ["read", "worker", "write", "admin"]),
    ],
)
def test_whoami_says_what_a_token_may_do(secured: TestClient, scope: str, satisfied: list[str]) -> None:
    token = make_token(secured, scope)
    answer = secured.get("/api/v1/whoami", headers=bearer(token))
    assert answer.status_code == 200
    assert answer.json() == {"auth": True, "scope": scope, "scopes": satisfied, "version": caviar.__version__}
    assert secured.get("/api/v1/whoami", headers=bearer("wrong")).status_code == 401


def test_whoami_without_auth_grants_everything(client: TestClient) -> None:
    answer = client.get("/api/v1/whoami").json()
    assert answer == {
        "auth": False,
        "scope": None,
        "scopes": ["read", "worker", "write", "admin"],
        "version": caviar.__version__,
    }
