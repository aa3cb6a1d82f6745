"""Tests that kill mutants a mutation audit found surviving (issue 26): what a user would lose.

Each test names the mutation it kills; each was seen failing with that mutation applied, on
SQLite and PostgreSQL.
"""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from caviar.service.db import Database
from caviar.service.trials import reap
from caviar.storage import TrialLease, utcnow
from tests.service.helpers import external_study

API = "/api/v1/studies"
PARAMS = {"lr": 0.01, "beta1": 0.9, "dropout": 0.1}


def create(client: TestClient, name: str = "s", **budget: object) -> str:
    response = client.post(API, json=external_study(name, **budget))  # type: ignore[arg-type]
    assert response.status_code == 201, response.text
    return name


def ask(client: TestClient, name: str, **body: object) -> dict:
    response = client.post(f"{API}/{name}/trials/ask", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def study(client: TestClient, name: str) -> dict:
    response = client.get(f"{API}/{name}")
    assert response.status_code == 200, response.text
    return response.json()


def test_a_workers_bulk_heartbeat_renews_its_own_leases_only(client: TestClient, db: Database) -> None:
    """Mutant: the bulk heartbeat renews every active lease of the studies it names (one live worker
    keeps a crashed one's trials alive forever: never reaped, never retried)."""
    name = create(client, n_trials=5, max_retries=1)
    live = ask(client, name, worker_id="live")["number"]
    silent = [
        ask(client, name, worker_id="silent")["number"],
        ask(client, name)["number"],
    ]  # a worker, a script
    with db.session() as session, session.begin():  # every lease lapsed: the silent ones crashed
        session.execute(update(TrialLease).values(expires_at=utcnow() - timedelta(seconds=1)))
    beat = client.post("/api/v1/workers/live/heartbeat", json={"trials": [{"study": name, "number": live}]})
    assert beat.status_code == 200 and beat.json()["lost"] == [], beat.text
    assert reap(db) == 2  # the silent trials only
    trials = {t["number"]: t for t in client.get(f"{API}/{name}/trials").json()["items"]}
    assert trials[live]["state"] == "running"
    for number in silent:
        assert (trials[number]["state"], trials[number]["fail_reason"]) == (
            "fail",
            "lease expired (no heartbeat)",
        )
    assert sorted(t["retry_of"] for t in trials.values() if t["state"] == "waiting") == silent


def test_enqueue_and_patch_cannot_overshoot_the_exact_budget(client: TestClient) -> None:
    """Mutant: waiting trials do not use the budget (``USING_BUDGET`` without WAITING): enqueued sets
    and a lowered ``n_trials`` overshoot it (6 trials handed out with ``n_trials: 3``)."""
    name = create(client, n_trials=3)
    enqueued = client.post(f"{API}/{name}/trials/enqueue", json={"trials": [{"params": PARAMS}] * 3})
    assert enqueued.status_code == 201, enqueued.text
    more = client.post(f"{API}/{name}/trials/enqueue", json={"trials": [{"params": PARAMS}]})
    assert more.status_code == 409 and more.json()["error"]["code"] == "budget_exhausted"
    lowered = client.patch(f"{API}/{name}", json={"budget": {"n_trials": 2}})
    assert lowered.status_code == 409 and lowered.json()["error"]["code"] == "budget_below_used"
    handed_out = [ask(client, name)["number"] for _ in range(3)]
    assert sorted(handed_out) == [0, 1, 2]  # the enqueued sets, and nothing besides them
    refused = client.post(f"{API}/{name}/trials/ask", json={})
    assert refused.status_code != 200, refused.text
    assert study(client, name)["trial_counts"]["running"] == 3


def test_a_failed_study_with_hand_backs_resumes_when_max_failed_trials_is_raised(client: TestClient) -> None:
    """Mutant: resume counts hand-backs as failures (the study stays failed)."""
    name = create(client, n_trials=10, max_retries=0, max_failed_trials=1)
    for _ in range(2):
        number = ask(client, name)["number"]
        assert client.post(f"{API}/{name}/trials/{number}/release").status_code == 200
    for _ in range(2):
        number = ask(client, name)["number"]
        told = client.post(f"{API}/{name}/trials/{number}/tell", json={"state": "fail", "reason": "crash"})
        assert told.status_code == 200, told.text
    assert study(client, name)["state"] == "failed"  # 2 failures > 1; the 2 hand-backs are none
    raised = client.patch(f"{API}/{name}", json={"budget": {"max_failed_trials": 2}})
    assert raised.status_code == 200, raised.text
    assert raised.json()["state"] not in {"failed", "completed", "stopped"}, raised.json()
    assert ask(client, name)["number"] >= 4


@pytest.mark.slow  # 1,001 trials: about 10 s on SQLite, 40 s on PostgreSQL
def test_export_holds_every_trial_past_a_thousand(client: TestClient) -> None:
    """Mutant: export lists one page of 1,000 trials and stops there silently."""
    name = create(client, n_trials=1001)
    for count in (1000, 1):
        items = [{"params": PARAMS, "value": float(i)} for i in range(count)]
        response = client.post(f"{API}/{name}/trials/enqueue", json={"trials": items})
        assert response.status_code == 201, response.text
        answered = response.json()["items"]  # read back with one read of the study's trials
        assert [t["value"] for t in answered] == [float(i) for i in range(count)]
        assert all(t["state"] == "complete" and t["params"] == PARAMS for t in answered)
    rows = list(csv.DictReader(io.StringIO(client.get(f"{API}/{name}/trials/export").text)))
    assert [int(row["number"]) for row in rows] == list(range(1001))
    exported = client.get(f"{API}/{name}/trials/export", params={"format": "json"}).json()
    assert [t["number"] for t in exported] == list(range(1001))


def test_best_in_the_study_shows_decoded_params(client: TestClient) -> None:
    """Mutant: ``best`` inside ``GET /studies/{name}`` shows ``one_minus_beta1``, not ``beta1``."""
    name = create(client, n_trials=5)
    trial = ask(client, name)
    told = client.post(
        f"{API}/{name}/trials/{trial['number']}/tell", json={"state": "complete", "value": 0.5}
    )
    assert told.status_code == 200, told.text
    best = study(client, name)["best"]
    assert best["number"] == trial["number"] and best["params"] == trial["params"]
    assert set(best["params"]) == {"lr", "beta1", "dropout"} and 0.8 <= best["params"]["beta1"] <= 0.999
