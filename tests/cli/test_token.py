"""``caviar token ...`` and ``caviar workers`` over REST against one live service."""

from __future__ import annotations

import httpx

from tests.cli.conftest import Service


def test_create_list_revoke(service: Service) -> None:
    created = service.run("token", "create", "--scope", "worker", "--name", "gpu box")
    secret = created.strip().splitlines()[-1]
    assert secret.startswith("cvr_") and "shown only once" in created
    listed = service.invoke("token", "list", "--json")
    assert secret not in listed.output
    (item,) = [t for t in service.json("token", "list")["items"] if t["name"] == "gpu box"]
    assert item["scope"] == "worker"
    table = service.run("token", "list")
    assert "gpu box" in table and secret not in table
    assert f"revoked token {item['id']}" in service.run("token", "revoke", str(item["id"]))
    assert all(t["id"] != item["id"] for t in service.json("token", "list")["items"])
    assert any(
        t["id"] == item["id"] and t["revoked_at"] for t in service.json("token", "list", "--all")["items"]
    )
    assert "no token" in service.invoke("token", "revoke", "999", code=1).stderr
    assert service.invoke("token", "create", "--scope", "root", code=2).exit_code == 2  # a usage error


def test_a_created_token_works_and_its_scope_holds(service: Service) -> None:
    token = service.json("token", "create", "--scope", "read")["token"]
    with httpx.Client(base_url=service.base, headers={"Authorization": f"Bearer {token}"}) as http:
        assert http.get("/api/v1/studies").status_code == 200
    assert service.invoke("study", "list", "--token", token).exit_code == 0
    refused = service.invoke("token", "list", "--token", token, code=1)
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.output


def test_workers_lists_registered_workers(service: Service) -> None:
    with service.http() as http:
        registered = http.post(
            "/api/v1/workers", json={"id": "host-1", "host": "host", "pid": 42, "device": "cpu"}
        )
        assert registered.status_code == 201, registered.text
    (worker,) = [w for w in service.json("workers")["items"] if w["id"] == "host-1"]
    assert worker["device"] == "cpu"
    table = service.run("workers")
    assert "host-1" in table and "cpu" in table
