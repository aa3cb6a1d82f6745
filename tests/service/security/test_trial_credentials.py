"""What the program a worker runs can do with its credential, and what read scope sees of code studies."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from caviar.service.auth import required_scope
from caviar.service.security import OPEN_PATHS
from caviar.service.tokens import trial as trial_tokens
from tests.service.helpers import external_study
from tests.service.security.conftest import ADMIN, API, bearer, token_of

SECRET = "hunter2-do-not-show"


def ask(client: TestClient, study: str, token: str, worker: str = "w-1") -> dict[str, Any]:
    response = client.post(
        f"{API}/studies/{study}/trials/ask", json={"worker_id": worker}, headers=bearer(token)
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def command_study(name: str) -> dict[str, Any]:
    body = external_study(name)
    body["objective"] = {"kind": "command", "command": ["python", "t.py", "{lr}"], "env": {"API_KEY": SECRET}}
    return body


def test_a_trial_credential_acts_on_its_own_running_trial_only(secured: TestClient) -> None:
    worker = token_of(secured, "worker")
    for name in ("a", "b"):
        assert (
            secured.post(f"{API}/studies", json=external_study(name), headers=bearer(ADMIN)).status_code
            == 201
        )
    mine, other, elsewhere = ask(secured, "a", worker), ask(secured, "a", worker), ask(secured, "b", worker)
    credential = mine["credential"]
    assert credential.startswith("cvt_") and worker not in credential
    assert other["credential"] != credential
    own = f"{API}/studies/a/trials/{mine['number']}"
    report = {"step": 0, "value": 0.5, "worker_id": "w-1"}
    assert secured.post(f"{own}/report", json=report, headers=bearer(credential)).status_code == 200
    assert (
        secured.post(f"{own}/heartbeat", json={"worker_id": "w-1"}, headers=bearer(credential)).status_code
        == 204
    )
    upload = secured.post(
        f"{own}/artifacts",
        params={"filename": "m.txt"},
        content=b"x",
        headers={**bearer(credential), "Content-Type": "application/octet-stream"},
    )
    assert upload.status_code == 201, upload.text
    assert secured.get(own, headers=bearer(credential)).status_code == 200

    # another trial of its study, a trial of another study, anything else: refused, nothing changed
    refused = [
        secured.post(f"{API}/studies/a/trials/{other['number']}/report", json=report, headers=bearer(credential)),
        secured.post(f"{API}/studies/a/trials/{other['number']}/tell", json={"state": "complete", "value": 9.0,
                     "worker_id": "w-1"}, headers=bearer(credential)),
        secured.post(f"{API}/studies/b/trials/{elsewhere['number']}/tell", json={"state": "complete",
                     "value": 9.0, "worker_id": "w-1"}, headers=bearer(credential)),
        secured.post(f"{API}/studies", json=external_study("c"), headers=bearer(credential)),
        secured.post(f"{API}/studies/a/trials/ask", json={}, headers=bearer(credential)),
        secured.post(f"{own}/release", json={}, headers=bearer(credential)),
        secured.post(f"{API}/studies/a/stop", json={}, headers=bearer(credential)),
        secured.get(f"{API}/studies", headers=bearer(credential)),
        secured.get(f"{API}/studies/a", headers=bearer(credential)),
        secured.post(f"{API}/tokens", json={"scope": "admin"}, headers=bearer(credential)),
        secured.post(f"{API}/workers", json={"id": "x", "host": "h", "pid": 1, "device": "cpu"},
                     headers=bearer(credential)),
    ]  # fmt: skip
    assert [r.status_code for r in refused] == [403, 403, 409, 403, 403, 403, 403, 403, 403, 403, 403], [
        r.text for r in refused
    ]
    assert all(r.json()["error"]["code"] in ("forbidden", "lease_lost") for r in refused)
    states = {
        t["number"]: t["state"]
        for t in secured.get(f"{API}/studies/a/trials", headers=bearer(ADMIN)).json()["items"]
    }
    assert states == {mine["number"]: "running", other["number"]: "running"}
    assert secured.get(f"{API}/studies/c", headers=bearer(ADMIN)).status_code == 404
    assert secured.get(f"{API}/studies/a", headers=bearer(ADMIN)).json()["state"] == "running"

    told = secured.post(f"{own}/tell", json={"state": "complete", "value": 0.5, "worker_id": "w-1"},
                        headers=bearer(credential))  # fmt: skip
    assert told.status_code == 200, told.text
    # the trial ended: so did its credential
    after = secured.post(f"{own}/heartbeat", json={"worker_id": "w-1"}, headers=bearer(credential))
    assert after.status_code == 409 and after.json()["error"]["code"] == "lease_lost"


def test_a_forged_or_recycled_credential_is_refused(secured: TestClient) -> None:
    worker = token_of(secured, "worker")
    secured.post(f"{API}/studies", json=external_study("a"), headers=bearer(ADMIN))
    trial = ask(secured, "a", worker)
    credential = trial["credential"]
    forged = credential[:-4] + ("0000" if not credential.endswith("0000") else "1111")
    own = f"{API}/studies/a/trials/{trial['number']}/heartbeat"
    assert secured.post(own, json={}, headers=bearer(forged)).status_code == 401
    other_key = trial_tokens.mint(trial_tokens.derive_key("another admin token"), 1, 1, trial["number"])
    assert secured.post(own, json={}, headers=bearer(other_key)).status_code == 401
    # the study deleted and created again under its name: the old credential names the old trial
    assert secured.delete(f"{API}/studies/a", headers=bearer(ADMIN)).status_code == 204
    secured.post(f"{API}/studies", json=external_study("a"), headers=bearer(ADMIN))
    again = ask(secured, "a", worker)
    assert again["number"] == trial["number"]
    stale = secured.post(own, json={}, headers=bearer(credential))
    assert stale.status_code == 409, stale.text


def test_without_tokens_an_ask_hands_out_no_credential(client: TestClient) -> None:
    client.post(f"{API}/studies", json=external_study("a"))
    assert client.post(f"{API}/studies/a/trials/ask", json={}).json()["credential"] is None


def test_read_scope_sees_env_names_not_values(secured: TestClient) -> None:
    read, worker = token_of(secured, "read"), token_of(secured, "worker")
    created = secured.post(f"{API}/studies", json=command_study("code"), headers=bearer(ADMIN))
    assert created.status_code == 201, created.text
    schedule = {
        "name": "nightly",
        "cron": "0 3 * * *",
        "template": {k: v for k, v in command_study("x").items() if k != "name"},
    }
    assert secured.post(f"{API}/schedules", json=schedule, headers=bearer(ADMIN)).status_code == 201
    reads = {
        "study": lambda t: secured.get(f"{API}/studies/code", headers=bearer(t)).json()["definition"],
        "list": lambda t: secured.get(f"{API}/studies", headers=bearer(t)).json()["items"][0]["definition"],
        "queue": lambda t: secured.get(f"{API}/queue", headers=bearer(t)).json()["items"][0]["definition"],
        "schedule": lambda t: secured.get(f"{API}/schedules/nightly", headers=bearer(t)).json()["template"],
        "schedules": lambda t: secured.get(f"{API}/schedules", headers=bearer(t)).json()["items"][0]["template"],
    }  # fmt: skip
    for what, read_it in reads.items():
        assert read_it(read)["objective"]["env"] == {"API_KEY": "<redacted>"}, what
        assert read_it(worker)["objective"]["env"] == {"API_KEY": SECRET}, what
        assert read_it(ADMIN)["objective"]["env"] == {"API_KEY": SECRET}, what
    for path in ("/studies", "/studies/code", "/queue", "/schedules", "/schedules/nightly"):
        assert SECRET not in secured.get(f"{API}{path}", headers=bearer(read)).text, path


def test_a_trial_log_needs_the_scope_that_reads_env_values(secured: TestClient) -> None:
    read, worker = token_of(secured, "read"), token_of(secured, "worker")
    secured.post(f"{API}/studies", json=command_study("code"), headers=bearer(ADMIN))
    trial = ask(secured, "code", worker)
    base = f"{API}/studies/code/trials/{trial['number']}/artifacts"
    for name in ("trial.log", "other.txt"):
        stored = secured.post(base, params={"filename": name}, content=SECRET.encode(),
                              headers={**bearer(worker), "Content-Type": "application/octet-stream",
                                       "X-Caviar-Lease": trial["credential"]})  # fmt: skip
        assert stored.status_code == 201, stored.text
    denied = secured.get(f"{base}/trial.log", headers=bearer(read))
    assert denied.status_code == 403 and SECRET not in denied.text
    assert secured.get(f"{base}/trial.log", headers=bearer(worker)).content == SECRET.encode()
    assert secured.get(f"{base}/other.txt", headers=bearer(read)).status_code == 200
    assert required_scope("GET", "/api/v1/studies/s/trials/0/artifacts/trial.log", OPEN_PATHS) == "worker"
    assert required_scope("GET", "/api/v1/studies/s/trials/0/artifacts/model.pt", OPEN_PATHS) == "read"


def test_a_trial_credential_may_not_list_its_trials_files(secured: TestClient) -> None:
    """A credential reads its own trial, not the trial's artifact list (mutants: any method with an
    action, or any safe method, allowed)."""
    worker = token_of(secured, "worker")
    assert secured.post(f"{API}/studies", json=external_study("a"), headers=bearer(ADMIN)).status_code == 201
    mine = ask(secured, "a", worker)
    own = f"{API}/studies/a/trials/{mine['number']}"
    listed = secured.get(f"{own}/artifacts", headers=bearer(mine["credential"]))
    assert listed.status_code == 403 and listed.json()["error"]["code"] == "forbidden", listed.text
    assert secured.get(own, headers=bearer(mine["credential"])).status_code == 200


def test_a_worker_token_reports_a_batch_only_for_the_trials_it_proves(secured: TestClient) -> None:
    worker = token_of(secured, "worker")
    secured.post(f"{API}/studies", json=external_study("a"), headers=bearer(ADMIN))
    mine, other = ask(secured, "a", worker), ask(secured, "a", worker)
    batch = f"{API}/studies/a/trials/reports"
    items = [
        {"number": mine["number"], "step": 0, "value": 0.5, "credential": mine["credential"]},
        {"number": other["number"], "step": 0, "value": 0.5},  # no proof
        {"number": other["number"], "step": 1, "value": 0.5, "credential": mine["credential"]},  # not its own
        {"number": other["number"], "step": 2, "value": 0.5, "credential": "cvt_forged"},
    ]
    answer = secured.post(batch, json={"reports": items}, headers=bearer(worker))
    assert answer.status_code == 200, answer.text
    assert [r["code"] for r in answer.json()["results"]] == [
        None,
        "not_your_trial",
        "not_your_trial",
        "not_your_trial",
    ]
    trials = {
        t["number"]: t for t in secured.get(f"{API}/studies/a/trials", headers=bearer(ADMIN)).json()["items"]
    }
    assert trials[mine["number"]]["intermediate_values"] == {"0": 0.5}
    assert trials[other["number"]]["intermediate_values"] == {}
    # write scope acts on any trial; read scope may not send a batch
    written = secured.post(batch, json={"reports": items[1:2]}, headers=bearer(token_of(secured, "write")))
    assert written.json()["results"][0]["code"] is None
    assert (
        secured.post(
            batch, json={"reports": items[:1]}, headers=bearer(token_of(secured, "read"))
        ).status_code
        == 403
    )
    # a trial credential (what a fused group's program holds) sends a batch in its own study, each
    # report proved by its own trial's credential
    by_trial = secured.post(batch, json={"reports": items[:2]}, headers=bearer(mine["credential"]))
    assert [r["code"] for r in by_trial.json()["results"]] == [None, "not_your_trial"]
    secured.post(f"{API}/studies", json=external_study("b"), headers=bearer(ADMIN))
    elsewhere = secured.post(
        f"{API}/studies/b/trials/reports", json={"reports": items[:1]}, headers=bearer(mine["credential"])
    )
    assert elsewhere.status_code == 409  # not its study: as for any route of another study's trial
    told = f"{API}/studies/a/trials/{mine['number']}/tell"
    secured.post(told, json={"state": "complete", "value": 0.5}, headers=bearer(mine["credential"]))
    ended = secured.post(batch, json={"reports": items[1:2]}, headers=bearer(mine["credential"]))
    assert ended.status_code == 409 and ended.json()["error"]["code"] == "lease_lost"  # its trial ended
