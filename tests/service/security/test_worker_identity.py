"""A worker id belongs to the registration that made it: a heartbeat under it needs its credential."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from caviar.storage import WorkerRecord
from tests.service.helpers import external_study
from tests.service.security.conftest import ADMIN, API, bearer, token_of

REGISTER = {"id": "w-victim", "host": "victim-host", "pid": 1, "device": "cpu"}


def register(client: TestClient, token: str, **fields: Any) -> dict[str, Any]:
    response = client.post(f"{API}/workers", json=REGISTER | fields, headers=bearer(token))
    assert response.status_code == 201, response.text
    return dict(response.json())


def row(db, worker_id: str = "w-victim") -> tuple[Any, ...]:  # type: ignore[no-untyped-def]
    with db.session() as session:
        record = session.get(WorkerRecord, worker_id)
        assert record is not None
        return (record.host, record.status, record.current_trials, record.started_at, record.last_seen_at)


def test_a_heartbeat_under_another_workers_id_is_refused_and_changes_nothing(secured: TestClient, db) -> None:  # type: ignore[no-untyped-def]
    victim, intruder = token_of(secured, "worker"), token_of(secured, "worker")
    assert secured.post(f"{API}/studies", json=external_study("s"), headers=bearer(ADMIN)).status_code == 201
    asked = secured.post(
        f"{API}/studies/s/trials/ask", json={"worker_id": "w-victim"}, headers=bearer(victim)
    )
    trial = {"study": "s", "number": asked.json()["number"], "credential": asked.json()["credential"]}
    mine = register(secured, victim)["credential"]
    assert mine.startswith("cvw_")
    other = register(secured, intruder, id="w-intruder")["credential"]
    before = row(db)

    # no credential, the intruder's own (valid, for its own id), a forged one; the same token too
    forged = mine[:-4] + ("0000" if not mine.endswith("0000") else "1111")
    for token, proof in ((intruder, None), (intruder, other), (intruder, forged), (victim, None)):
        for status in ("busy", "idle", "stopped"):
            body = {
                "status": status,
                "trials": [{"study": "s", "number": 0}],
                **({"credential": proof} if proof else {}),
            }
            refused = secured.post(f"{API}/workers/w-victim/heartbeat", json=body, headers=bearer(token))
            assert refused.status_code == 409, refused.text
            assert refused.json()["error"]["code"] == "not_your_worker", refused.text
    assert row(db) == before  # not seen, not stopped, no trials listed
    # the victim is still live, so its id cannot be registered again (a "stopped" beat would have freed it)
    taken = secured.post(f"{API}/workers", json=REGISTER | {"host": "evil"}, headers=bearer(intruder))
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "worker_id_taken", taken.text

    # the holder, with its registration's credential
    beat = secured.post(
        f"{API}/workers/w-victim/heartbeat",
        json={"status": "busy", "trials": [trial], "credential": mine},
        headers=bearer(victim),
    )
    assert beat.status_code == 200 and beat.json()["lost"] == [], beat.text
    listed = secured.get(f"{API}/workers", headers=bearer(intruder))
    assert mine not in listed.text  # the credential is never shown
    # write and admin scope act on any worker (an operator); they need no credential
    assert (
        secured.post(f"{API}/workers/w-victim/heartbeat", json={}, headers=bearer(ADMIN)).status_code == 200
    )


def test_a_stopped_id_can_be_registered_again_and_the_old_credential_stops_working(
    secured: TestClient, db
) -> None:  # type: ignore[no-untyped-def]
    first, second = token_of(secured, "worker"), token_of(secured, "worker")
    old = register(secured, first)["credential"]
    stopped = secured.post(
        f"{API}/workers/w-victim/heartbeat",
        json={"status": "stopped", "credential": old},
        headers=bearer(first),
    )
    assert stopped.status_code == 200, stopped.text
    # a stopped registration is free: another registration (any worker token) takes the id over
    new = register(secured, second, host="new-host")["credential"]
    assert new != old
    refused = secured.post(
        f"{API}/workers/w-victim/heartbeat", json={"status": "busy", "credential": old}, headers=bearer(first)
    )
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_your_worker", refused.text
    assert row(db)[:2] == ("new-host", "idle")
    ok = secured.post(f"{API}/workers/w-victim/heartbeat", json={"credential": new}, headers=bearer(second))
    assert ok.status_code == 200, ok.text
    # an id nobody registered has nothing to protect: its heartbeat renews by trial credentials only
    assert (
        secured.post(f"{API}/workers/never-registered/heartbeat", json={}, headers=bearer(first)).status_code
        == 200
    )


def test_without_tokens_a_registration_has_no_credential_and_heartbeats_need_none(client: TestClient) -> None:
    registered = client.post(f"{API}/workers", json=REGISTER)
    assert registered.status_code == 201 and registered.json()["credential"] is None
    assert client.post(f"{API}/workers/w-victim/heartbeat", json={"status": "idle"}).status_code == 200
