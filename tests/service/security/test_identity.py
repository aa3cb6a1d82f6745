"""A trial is bound to the credential that claimed it: a worker id is a label, never proof."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from caviar.service.errors import Conflict
from caviar.service.store import artifact_store, lease_of, load_record, trial_id
from caviar.service.trials import artifacts
from tests.service.helpers import external_study
from tests.service.security.conftest import ADMIN, API, bearer, token_of

LEASE = "X-Caviar-Lease"
OCTETS = {"Content-Type": "application/octet-stream"}


def ask(client: TestClient, study: str, token: str, worker: str) -> dict[str, Any]:
    response = client.post(
        f"{API}/studies/{study}/trials/ask", json={"worker_id": worker}, headers=bearer(token)
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def stored_files(settings: Any) -> list[Path]:
    root = Path(settings.artifact_dir)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_replaying_another_workers_id_with_a_worker_token_changes_nothing(
    secured: TestClient, db, settings
) -> None:  # type: ignore[no-untyped-def]
    victim, intruder = token_of(secured, "worker"), token_of(secured, "worker")
    assert (
        secured.post(
            f"{API}/studies", json=external_study("s", n_trials=5), headers=bearer(ADMIN)
        ).status_code
        == 201
    )
    theirs = ask(secured, "s", victim, "w-victim")
    register = {"id": "w-victim", "host": "h", "pid": 1, "device": "cpu"}
    registered = secured.post(f"{API}/workers", json=register, headers=bearer(victim))
    assert registered.status_code == 201, registered.text
    victim_worker = registered.json()["credential"]
    mine = ask(secured, "s", intruder, "w-intruder")
    number = theirs["number"]
    trial = f"{API}/studies/s/trials/{number}"
    # anyone with read scope learns whose trial it is
    label = secured.get(trial, headers=bearer(intruder)).json()["worker_id"]
    assert label == "w-victim"
    record = load_record(db, "s")
    lease_before = lease_of(db, trial_id(db, record, number))
    assert lease_before is not None

    as_victim = {"worker_id": label}
    attempts = [
        ("report", {"step": 0, "value": 999.0}),
        ("heartbeat", {}),
        ("suggest", {"name": "extra", "distribution": {"type": "float", "low": 0, "high": 1}}),
        ("tell", {"state": "complete", "value": 999.0}),
        ("tell", {"state": "fail"}),
        ("release", {}),
    ]
    # the worker id alone, the intruder's own (valid) credential for another trial, and a garbled one
    for proof in ({}, {LEASE: mine["credential"]}, {LEASE: theirs["credential"][:-2] + "00"}):
        for action, body in attempts:
            refused = secured.post(
                f"{trial}/{action}", json=body | as_victim, headers=bearer(intruder) | proof
            )
            assert refused.status_code in (403, 409), (action, proof, refused.text)
            assert refused.json()["error"]["code"] == "not_your_trial", refused.text
        planted = secured.post(
            f"{trial}/artifacts", params={"filename": "checkpoint.pt"}, content=b"planted",
            headers=bearer(intruder) | OCTETS | proof,
        )  # fmt: skip
        assert planted.status_code == 409 and planted.json()["error"]["code"] == "not_your_trial", (
            planted.text
        )
    # the bulk heartbeat under the victim's id: refused (not the intruder's registration)
    listed = {"trials": [{"study": "s", "number": number, "credential": mine["credential"]}]}
    beat = secured.post(f"{API}/workers/w-victim/heartbeat", json=listed, headers=bearer(intruder))
    assert beat.status_code == 409 and beat.json()["error"]["code"] == "not_your_worker", beat.text
    # under its own id: the victim's lease is not renewed, the trial is not the intruder's
    own = secured.post(
        f"{API}/workers", json=register | {"id": "w-intruder"}, headers=bearer(intruder)
    ).json()["credential"]
    beat = secured.post(
        f"{API}/workers/w-intruder/heartbeat", json=listed | {"credential": own}, headers=bearer(intruder)
    )
    assert beat.status_code == 200, beat.text
    assert beat.json()["lost"] == [{"study": "s", "number": number, "code": "not_your_trial"}]
    # and the registration is not taken over
    taken = secured.post(f"{API}/workers", json=register | {"host": "evil"}, headers=bearer(intruder))
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "worker_id_taken", taken.text
    assert {
        w["id"]: w["host"] for w in secured.get(f"{API}/workers", headers=bearer(ADMIN)).json()["items"]
    } == {"w-victim": "h", "w-intruder": "h"}

    # nothing changed: still running, no value, no parameter, no file, the same lease
    read = secured.get(trial, headers=bearer(ADMIN)).json()
    assert read["state"] == "running" and read["intermediate_values"] == {} and "extra" not in read["params"]
    assert secured.get(f"{trial}/artifacts", headers=bearer(ADMIN)).json() == []
    assert stored_files(settings) == []
    lease_after = lease_of(db, trial_id(db, record, number))
    assert lease_after is not None and lease_after.status == "active"
    assert lease_after.expires_at == lease_before.expires_at

    # the holder, with the credential its ask answered, still acts (its worker id is only a label)
    holder = bearer(victim) | {LEASE: theirs["credential"]}
    assert secured.post(f"{trial}/heartbeat", json={}, headers=holder).status_code == 204
    renewed = secured.post(
        f"{API}/workers/w-victim/heartbeat",
        json={
            "credential": victim_worker,
            "trials": [{"study": "s", "number": number, "credential": theirs["credential"]}],
        },
        headers=bearer(victim),
    )
    assert renewed.json()["lost"] == []
    workers = secured.get(f"{API}/workers", headers=bearer(intruder))
    assert theirs["credential"] not in workers.text and victim_worker not in workers.text  # never shown
    current = {w["id"]: w["current_trials"] for w in workers.json()["items"]}
    assert current["w-victim"] == [{"study": "s", "number": number}]
    told = secured.post(f"{trial}/tell", json={"state": "complete", "value": 0.5}, headers=holder)
    assert told.status_code == 200 and told.json()["values"] == [0.5], told.text
    # write scope acts on any trial
    other = f"{API}/studies/s/trials/{mine['number']}"
    assert (
        secured.post(f"{other}/report", json={"step": 0, "value": 1.0}, headers=bearer(ADMIN)).status_code
        == 200
    )


def test_a_checkpoint_planted_by_another_worker_is_never_served(secured: TestClient, settings) -> None:  # type: ignore[no-untyped-def]
    victim, intruder = token_of(secured, "worker"), token_of(secured, "worker")
    secured.post(f"{API}/studies", json=external_study("s", n_trials=5), headers=bearer(ADMIN))
    theirs = ask(secured, "s", victim, "w-victim")
    trial = f"{API}/studies/s/trials/{theirs['number']}"
    planted = secured.post(
        f"{trial}/artifacts", params={"filename": "checkpoint.pt"}, content=b"planted",
        headers=bearer(intruder) | OCTETS,
    )  # fmt: skip
    assert planted.status_code == 409, planted.text
    holder = bearer(victim) | {LEASE: theirs["credential"]}
    assert (
        secured.post(f"{trial}/tell", json={"state": "complete", "value": 0.5}, headers=holder).status_code
        == 200
    )
    missing = secured.get(f"{API}/studies/s/checkpoint", headers=bearer(ADMIN))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "checkpoint_not_found"
    assert stored_files(settings) == []


def test_the_checkpoint_is_the_last_upload_in_time(
    secured: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = token_of(secured, "worker")
    secured.post(f"{API}/studies", json=external_study("s", n_trials=5), headers=bearer(ADMIN))
    theirs = ask(secured, "s", worker, "w-1")
    trial = f"{API}/studies/s/trials/{theirs['number']}"
    holder = bearer(worker) | {LEASE: theirs["credential"]}
    # each upload gets a smaller random id than the one before: "newest" must not mean "highest id"
    ids = iter(uuid.UUID(int=(2**128 - 1) - n * 2**100) for n in range(100))
    monkeypatch.setattr(uuid, "uuid4", lambda: next(ids))
    for version in range(4):
        stored = secured.post(
            f"{trial}/artifacts", params={"filename": "checkpoint.pt"}, content=f"v{version}".encode(),
            headers=holder | OCTETS,
        )  # fmt: skip
        assert stored.status_code == 201, stored.text
        assert secured.get(f"{trial}/checkpoint", headers=bearer(ADMIN)).content == f"v{version}".encode()
        assert (
            secured.get(f"{trial}/artifacts/checkpoint.pt", headers=bearer(ADMIN)).content
            == f"v{version}".encode()
        )
    assert (
        secured.post(f"{trial}/tell", json={"state": "complete", "value": 0.5}, headers=holder).status_code
        == 200
    )
    assert secured.get(f"{API}/studies/s/checkpoint", headers=bearer(ADMIN)).content == b"v3"


def test_an_upload_to_a_finished_trial_is_refused_and_leaves_no_file(
    client: TestClient, db, settings, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    client.post(f"{API}/studies", json=external_study("s", n_trials=5))
    number = client.post(f"{API}/studies/s/trials/ask", json={}).json()["number"]
    trial = f"{API}/studies/s/trials/{number}"
    assert client.post(f"{trial}/tell", json={"state": "complete", "value": 0.5}).status_code == 200
    late = client.post(
        f"{trial}/artifacts", params={"filename": "checkpoint.pt"}, content=b"late", headers=OCTETS
    )
    assert late.status_code == 409 and late.json()["error"]["code"] == "trial_finished", late.text
    assert stored_files(settings) == []
    assert client.get(f"{trial}/artifacts").json() == []
    # the trial ends while the file is being stored (after the check): the file is removed again
    monkeypatch.setattr(artifacts, "check_upload", lambda *args, **kwargs: None)
    source = Path(settings.artifact_dir).parent / "checkpoint.pt"
    source.write_bytes(b"raced")
    with pytest.raises(Conflict) as raised:
        artifacts.save_artifact(db, artifact_store(settings.artifact_dir), "s", number, str(source))
    assert raised.value.code == "trial_finished"
    assert stored_files(settings) == []
