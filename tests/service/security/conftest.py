"""A service that needs tokens, and the helpers that make and send them (the security tests' base)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from caviar.service.api import create_app

ADMIN = "admin-" + "s3cur1ty-" * 4
API = "/api/v1"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def secured(settings, db) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    """The app with an admin token configured: every request needs a token."""
    secured_settings = settings.model_copy(update={"api_token": SecretStr(ADMIN)})
    with TestClient(create_app(secured_settings, db=db)) as client:
        yield client


def token_of(client: TestClient, scope: str) -> str:
    """A new token of ``scope``, made by the admin."""
    response = client.post(f"{API}/tokens", json={"scope": scope}, headers=bearer(ADMIN))
    assert response.status_code == 201, response.text
    return str(response.json()["token"])
