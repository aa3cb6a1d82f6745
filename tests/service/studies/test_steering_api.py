"""REST tests of steering a study: PATCH, stop, goals and deadlines, enqueue and import, warm start,
export, multi-objective importances, deleting artifacts, metric names (SQLite and PostgreSQL)."""

from __future__ import annotations

import csv
import io
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from caviar.service import store, trials
from caviar.service.db import Database
from caviar.service.store import lease_of
from caviar.service.trials.leases import end_overdue
from caviar.storage import StudyRecord, utcnow
from tests.service.helpers import POLICY, external_study

API = "/api/v1/studies"


def create(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(API, json=body)
    assert response.status_code == 201, response.text
    return response.json()


def ask(client: TestClient, name: str, **body: Any) -> dict[str, Any]:
    response = client.post(f"{API}/{name}/trials/ask", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def tell(
    client: TestClient, name: str, number: int, value: float | None = None, **body: Any
) -> dict[str, Any]:
    payload = {"state": "complete", "value": value} if value is not None else body
    response = client.post(f"{API}/{name}/trials/{number}/tell", json=payload)
    assert response.status_code == 200, response.text
    return response.json()


def patch(client: TestClient, name: str, body: dict[str, Any]) -> Any:
    return client.patch(f"{API}/{name}", json=body)


def code(response: Any) -> str:
    return str(response.json()["error"]["code"])


def study(client: TestClient, name: str) -> dict[str, Any]:
    return dict(client.get(f"{API}/{name}").json())


PARAMS = {"lr": 0.01, "beta1": 0.95, "dropout": 0.25}


# ---- PATCH ---------------------------------------------------------------------------------


def test_patch_raises_lowers_and_never_goes_below_used(client: TestClient) -> None:
    create(client, external_study("p", n_trials=3))
    for _ in range(3):
        ask(client, "p")
    assert code(client.post(f"{API}/p/trials/ask", json={})) == "budget_exhausted"
    raised = patch(client, "p", {"budget": {"n_trials": 5}})
    assert raised.status_code == 200, raised.text
    assert raised.json()["definition"]["budget"]["n_trials"] == 5
    assert raised.json()["definition_version"] == 2
    assert ask(client, "p")["number"] == 3  # every process sees the new budget at once
    below = patch(client, "p", {"budget": {"n_trials": 3}})
    assert below.status_code == 409 and code(below) == "budget_below_used"
    assert "4 trials are already used" in below.json()["error"]["message"]
    lowered = patch(client, "p", {"budget": {"n_trials": 4}})
    assert lowered.status_code == 200 and lowered.json()["definition"]["budget"]["n_trials"] == 4
    assert code(client.post(f"{API}/p/trials/ask", json={})) == "budget_exhausted"
    invalid = patch(client, "p", {"budget": {"n_trials": 0}})
    assert invalid.status_code == 422 and "n_trials" in invalid.json()["error"]["message"]
    unknown = patch(client, "p", {"budget": {"bogus": 1}})
    assert unknown.status_code == 422
    assert patch(client, "missing", {"priority": 1}).status_code == 404


def test_raising_the_budget_reopens_a_completed_study(client: TestClient) -> None:
    create(client, external_study("done", n_trials=2))
    for _ in range(2):
        tell(client, "done", ask(client, "done")["number"], 0.5)
    assert study(client, "done")["state"] == "completed"
    reopened = patch(client, "done", {"budget": {"n_trials": 3}}).json()
    assert reopened["state"] == "running"
    assert client.get(f"{API}?order=queue&state=running").json()["total"] == 1
    tell(client, "done", ask(client, "done")["number"], 0.7)
    assert study(client, "done")["state"] == "completed"


def test_lowering_to_what_is_done_completes_the_study(client: TestClient) -> None:
    create(client, external_study("low", n_trials=10))
    for _ in range(2):
        tell(client, "low", ask(client, "low")["number"], 0.5)
    assert patch(client, "low", {"budget": {"n_trials": 2}}).json()["state"] == "completed"


def test_a_failed_study_resumes_after_raising_max_failed_trials(client: TestClient) -> None:
    create(client, external_study("f", n_trials=10, max_retries=0, max_failed_trials=1))
    for _ in range(2):
        tell(client, "f", ask(client, "f")["number"], state="fail", reason="boom")
    assert study(client, "f")["state"] == "failed"
    assert code(client.post(f"{API}/f/trials/ask", json={})) == "study_failed"
    still = patch(client, "f", {"budget": {"max_failed_trials": 1}}).json()
    assert still["state"] == "failed"
    resumed = patch(client, "f", {"budget": {"max_failed_trials": 5}}).json()
    assert resumed["state"] == "running"
    ask(client, "f")
    refailed = patch(client, "f", {"budget": {"max_failed_trials": 0}}).json()
    assert refailed["state"] == "failed"


def test_patch_max_parallel_priority_tags_and_timeout(client: TestClient, db: Database) -> None:
    body = external_study("m", n_trials=10, max_parallel=1)
    body["tags"] = {"team": "vision", "old": "x"}
    create(client, body)
    first = ask(client, "m")
    limited = client.post(f"{API}/m/trials/ask", json={})
    assert limited.status_code == 429
    changed = patch(
        client,
        "m",
        {
            "budget": {"max_parallel": None, "trial_timeout_s": 60},
            "priority": 7,
            "tags": {"team": "nlp", "old": None, "new": "y"},
        },
    ).json()
    assert changed["priority"] == 7
    assert changed["definition"]["priority"] == 7
    assert changed["definition"]["tags"] == {"team": "nlp", "new": "y"}
    assert changed["definition"]["budget"]["max_parallel"] is None
    ask(client, "m")  # no parallel limit any more
    lease = lease_of(
        db, db.optuna.get_trial_id_from_study_id_trial_number(store.load_record(db, "m").optuna_study_id, 0)
    )
    assert lease is not None and lease.deadline_at is not None
    assert abs((lease.deadline_at - lease.started_at).total_seconds() - 60) < 1e-3
    assert first["number"] == 0
    assert client.get(f"{API}", params={"tag": "team=nlp"}).json()["total"] == 1
    bad = patch(client, "m", {"priority": 10**9})
    assert bad.status_code == 422


def test_patch_plans_auto_again_and_keeps_the_sobol_scramble(
    client: TestClient, db: Database, db_url: str
) -> None:
    """auto follows the edited budget (GP hands over to TPE once the study passes 200 trials), the
    dashboard's caviar:sampler follows it, and the Sobol warm-up keeps its scramble."""
    body = external_study("auto-edit", n_trials=60, max_parallel=1)
    body["sampler"] = {"type": "auto"}
    created = create(client, body)
    assert [stage["type"] for stage in created["sampler"]["stages"]] == ["sobol", "gp"]
    before = store.definition_of(store.load_record(db, "auto-edit"))
    changed = patch(client, "auto-edit", {"budget": {"n_trials": 400}})
    assert changed.status_code == 200, changed.text
    assert [stage["type"] for stage in changed.json()["sampler"]["stages"]] == ["sobol", "gp", "tpe"]
    loaded = optuna.load_study(study_name="auto-edit", storage=db_url)
    assert loaded.user_attrs["caviar:sampler"] == changed.json()["sampler"]
    after = store.definition_of(store.load_record(db, "auto-edit"))
    assert after._stream_seed == before._stream_seed


def test_goal_must_be_single_objective(client: TestClient) -> None:
    body = external_study("mo")
    body["directions"] = ["maximize", "minimize"]
    del body["direction"]
    body["metric"] = ["acc", "latency"]
    body["budget"]["goal"] = {"value": 0.9}
    response = client.post(API, json=body)
    assert response.status_code == 422 and "goal" in response.json()["error"]["message"]
    del body["budget"]["goal"]
    create(client, body)
    assert patch(client, "mo", {"budget": {"goal": {"value": 1.0}}}).status_code == 422


# ---- stop ----------------------------------------------------------------------------------


def test_stop_cancels_waiting_prunes_running_and_ends_stopped(client: TestClient, db: Database) -> None:
    create(client, external_study("s", n_trials=10, max_retries=2))
    running = [ask(client, "s", worker_id="w1")["number"] for _ in range(2)]
    tell(client, "s", running[0], state="fail", reason="crash")  # a retry now waits
    assert study(client, "s")["trial_counts"]["waiting"] == 1
    enqueued = client.post(f"{API}/s/trials/enqueue", json={"trials": [{"params": PARAMS}]})
    assert enqueued.status_code == 201
    stopped = client.post(f"{API}/s/stop", json={"reason": "enough"})
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["state"] == "stopping"
    assert stopped.json()["stop_reason"] == "stopped by request: enough"
    counts = stopped.json()["trial_counts"]
    assert counts["waiting"] == 0 and counts["running"] == 1
    cancelled = [t for t in client.get(f"{API}/s/trials", params={"state": "fail"}).json()["items"]]
    assert sum("cancelled: stopped by request" in (t["fail_reason"] or "") for t in cancelled) == 2
    refused = client.post(f"{API}/s/trials/ask", json={})
    assert refused.status_code == 409 and code(refused) == "study_stopped"
    beat = client.post(f"{API}/s/trials/{running[1]}/heartbeat", json={})
    assert beat.status_code == 409 and code(beat) == "study_stopped"
    bulk = client.post(
        "/api/v1/workers/w1/heartbeat", json={"trials": [{"study": "s", "number": running[1]}]}
    )
    assert bulk.json()["lost"] == [{"study": "s", "number": running[1], "code": "study_stopped"}]
    report = client.post(f"{API}/s/trials/{running[1]}/report", json={"step": 1, "value": 0.3})
    assert report.json() == {"should_prune": True}
    assert client.post(f"{API}/s/stop").json()["state"] == "stopping"  # again: no change
    tell(client, "s", running[1], state="pruned")
    final = study(client, "s")
    assert final["state"] == "stopped"
    assert final["trial_counts"]["running"] == 0 and final["trial_counts"]["waiting"] == 0
    again = client.post(f"{API}/s/stop")
    assert again.status_code == 409 and code(again) == "invalid_state"
    assert code(patch(client, "s", {"budget": {"n_trials": 20}})) == "study_stopped"
    assert patch(client, "s", {"priority": 3}).status_code == 200
    assert code(client.post(f"{API}/s/trials/enqueue", json={"trials": [{"params": PARAMS}]})) == (
        "study_stopped"
    )
    assert code(client.post(f"{API}/s/pause")) == "invalid_state"
    assert code(client.post(f"{API}/missing/stop")) == "study_not_found"
    # cancelled trials are not failures of the study
    assert store.load_record(db, "s").state == "stopped"


def test_stop_without_running_trials_is_stopped_at_once(client: TestClient) -> None:
    create(client, external_study("idle", n_trials=4))
    stopped = client.post(f"{API}/idle/stop")
    assert stopped.json()["state"] == "stopped" and stopped.json()["stop_reason"] == "stopped by request"
    done = create(client, external_study("done2", n_trials=1))
    tell(client, done["name"], ask(client, done["name"])["number"], 1.0)
    assert code(client.post(f"{API}/done2/stop")) == "invalid_state"


def test_a_reaped_trial_of_a_stopping_study_ends_it_without_a_retry(client: TestClient, db: Database) -> None:
    create(client, external_study("reap", n_trials=5, max_retries=3))
    number = ask(client, "reap")["number"]
    client.post(f"{API}/reap/stop")
    assert trials.reap(db, now=utcnow() + timedelta(hours=1)) == 1
    final = study(client, "reap")
    assert final["state"] == "stopped" and final["trial_counts"]["waiting"] == 0
    late = client.post(f"{API}/reap/trials/{number}/tell", json={"state": "complete", "value": 1.0})
    assert late.status_code == 409 and code(late) == "lease_lost"


# ---- goal and deadline ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "values", "reached"), [("maximize", [0.5, 0.99], 0.99), ("minimize", [0.5, 0.1], 0.1)]
)
def test_goal_ends_the_study(client: TestClient, direction: str, values: list[float], reached: float) -> None:
    body = external_study("g", n_trials=10)
    body["direction"] = direction
    body["budget"]["goal"] = {"value": 0.98 if direction == "maximize" else 0.2}
    create(client, body)
    first, second, third = (ask(client, "g")["number"] for _ in range(3))
    tell(client, "g", first, values[0])
    assert study(client, "g")["state"] == "running"
    tell(client, "g", second, values[1])
    ended = study(client, "g")
    assert ended["state"] == "stopping" and f"{reached:g}" in ended["stop_reason"]
    assert ended["stop_reason"].startswith(f"goal reached: trial {second} value=")
    assert code(client.post(f"{API}/g/trials/ask", json={})) == "study_stopped"
    tell(client, "g", third, 0.0 if direction == "maximize" else 1.0)
    assert study(client, "g")["state"] == "stopped"


def test_a_goal_set_by_patch_or_met_by_an_import_ends_the_study(client: TestClient) -> None:
    create(client, external_study("g2", n_trials=10))
    tell(client, "g2", ask(client, "g2")["number"], 0.9)
    assert patch(client, "g2", {"budget": {"goal": {"value": 0.85}}}).json()["state"] == "stopped"
    create(client, {**external_study("g3", n_trials=10), "budget": {"n_trials": 10, "goal": {"value": 0.9}}})
    imported = client.post(f"{API}/g3/trials/enqueue", json={"trials": [{"params": PARAMS, "value": 0.95}]})
    assert imported.status_code == 201
    assert study(client, "g3")["state"] == "stopped"


def test_max_duration_ends_the_study(client: TestClient, db: Database) -> None:
    create(client, external_study("d", n_trials=10, max_duration_s=3600))
    number = ask(client, "d")["number"]
    started = study(client, "d")["started_at"]
    assert started is not None
    assert end_overdue(db, now=utcnow()) == []
    with db.session() as session, session.begin():  # an hour and a bit later
        session.execute(
            update(StudyRecord)
            .where(StudyRecord.name == "d")
            .values(started_at=utcnow() - timedelta(hours=2))
        )
    refused = client.post(f"{API}/d/trials/ask", json={})  # the ask sees the deadline itself
    assert refused.status_code == 409 and code(refused) == "study_stopped"
    ended = study(client, "d")
    assert ended["state"] == "stopping" and ended["stop_reason"].startswith("deadline: budget.max_duration_s")
    tell(client, "d", number, 0.5)
    assert study(client, "d")["state"] == "stopped"


def test_the_reaper_ends_overdue_studies(client: TestClient, db: Database) -> None:
    create(client, external_study("d2", n_trials=10, max_duration_s=10))
    ask(client, "d2")
    assert end_overdue(db, now=utcnow() + timedelta(seconds=11)) == ["d2"]
    assert study(client, "d2")["state"] == "stopping"


# ---- enqueue and import --------------------------------------------------------------------


def test_enqueued_sets_are_handed_out_first_with_decoded_values(client: TestClient, db_url: str) -> None:
    create(client, external_study("e", n_trials=4))
    sets = [PARAMS, {"lr": 0.001, "beta1": 0.9, "dropout": 0.0}]
    response = client.post(f"{API}/e/trials/enqueue", json={"trials": [{"params": p} for p in sets]})
    assert response.status_code == 201, response.text
    listed = response.json()
    assert listed["total"] == 2 and [t["state"] for t in listed["items"]] == ["waiting", "waiting"]
    assert listed["items"][0]["params"] == PARAMS
    assert study(client, "e")["trial_counts"]["waiting"] == 2
    handed = [ask(client, "e")["params"] for _ in range(2)]
    assert handed == sets
    fresh = ask(client, "e")["params"]
    assert fresh not in sets
    loaded = optuna.load_study(study_name="e", storage=db_url).trials
    assert math.isclose(loaded[0].params["one_minus_beta1"], 0.05)
    assert loaded[0].user_attrs["beta1"] == 0.95
    assert loaded[0].params["lr"] == 0.01


def test_imported_results_are_complete_trials_optuna_and_samplers_see(
    client: TestClient, db_url: str
) -> None:
    create(client, external_study("imp", n_trials=5))
    items = [
        {"params": PARAMS, "value": 0.93, "user_attrs": {"source": "paper"}},
        {"params": {**PARAMS, "lr": 0.002}},
    ]
    response = client.post(f"{API}/imp/trials/enqueue", json={"trials": items})
    assert response.status_code == 201, response.text
    imported, waiting = response.json()["items"]
    assert imported["state"] == "complete" and imported["value"] == 0.93
    assert imported["params"] == PARAMS and imported["user_attrs"]["source"] == "paper"
    assert waiting["state"] == "waiting"
    best = client.get(f"{API}/imp/best").json()
    assert best["number"] == imported["number"] and best["params"]["beta1"] == 0.95
    loaded = optuna.load_study(study_name="imp", storage=db_url)
    assert loaded.best_trial.number == imported["number"]
    trial = loaded.best_trial
    assert math.isclose(trial.params["one_minus_beta1"], 0.05) and trial.user_attrs["beta1"] == 0.95
    assert isinstance(trial.distributions["one_minus_beta1"], optuna.distributions.FloatDistribution)
    assert trial.distributions["one_minus_beta1"].log
    waiting_trial = loaded.trials[waiting["number"]]
    assert waiting_trial.state == optuna.trial.TrialState.WAITING
    assert math.isclose(waiting_trial.system_attrs["fixed_params"]["one_minus_beta1"], 0.05)
    assert waiting_trial.user_attrs["beta1"] == 0.95
    # the sampler learns from the import: TPE's history holds it
    assert len(loaded.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 1
    counts = study(client, "imp")["trial_counts"]
    assert counts == {"waiting": 1, "running": 0, "complete": 1, "pruned": 0, "fail": 0}


@pytest.mark.parametrize(
    ("params", "field", "error"),
    [
        ({**PARAMS, "momentum": 0.9}, "trials.0.params.momentum", "unknown_parameter"),
        ({**PARAMS, "lr": 0.5}, "trials.0.params.lr", "out_of_range"),
        ({**PARAMS, "beta1": 0.9999}, "trials.0.params.beta1", "out_of_range"),
        ({"lr": 0.01, "dropout": 0.1}, "trials.0.params.beta1", "missing_parameter"),
        ({**PARAMS, "lr": "fast"}, "trials.0.params.lr", "invalid_value"),
        (
            {"lr": 0.01, "one_minus_beta1": 0.05, "dropout": 0.1},
            "trials.0.params.one_minus_beta1",
            "unknown_parameter",
        ),
    ],
)
def test_enqueue_refuses_sets_outside_the_space(
    client: TestClient, params: dict[str, Any], field: str, error: str
) -> None:
    create(client, external_study("bad", n_trials=5))
    response = client.post(f"{API}/bad/trials/enqueue", json={"trials": [{"params": params}]})
    assert response.status_code == 422, response.text
    body = response.json()["error"]
    assert body["code"] == error and body["message"].startswith(field)
    assert body["details"][0]["field"] == field
    assert study(client, "bad")["trial_counts"]["waiting"] == 0


def test_enqueue_checks_grids_choices_and_conditions(client: TestClient) -> None:
    body = external_study("space", n_trials=20)
    body["search_space"] = {
        "optimizer": {"type": "categorical", "choices": ["adam", "momentum"]},
        "momentum": {
            "type": "float",
            "low": 0.8,
            "high": 0.99,
            "scale": "reverse_log",
            "when": {"optimizer": ["momentum"]},
        },
        "layers": {"type": "int", "low": 1, "high": 7, "step": 2},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
    }
    create(client, body)

    def enqueue(params: dict[str, Any]) -> Any:
        return client.post(f"{API}/space/trials/enqueue", json={"trials": [{"params": params}]})

    good = enqueue({"optimizer": "momentum", "momentum": 0.9, "layers": 3, "dropout": 0.30000000000000004})
    assert good.status_code == 201, good.text
    assert good.json()["items"][0]["params"] == {
        "optimizer": "momentum",
        "momentum": 0.9,
        "layers": 3,
        "dropout": 0.30000000000000004,
    }
    assert enqueue({"optimizer": "adam", "layers": 7, "dropout": 0.5}).status_code == 201
    cases = [
        (
            {"optimizer": "adam", "momentum": 0.9, "layers": 3, "dropout": 0.1},
            "momentum",
            "inactive_parameter",
        ),
        ({"optimizer": "momentum", "layers": 3, "dropout": 0.1}, "momentum", "missing_parameter"),
        ({"optimizer": "sgd", "layers": 3, "dropout": 0.1}, "optimizer", "invalid_choice"),
        ({"optimizer": "adam", "layers": 2, "dropout": 0.1}, "layers", "off_grid"),
        ({"optimizer": "adam", "layers": 3.5, "dropout": 0.1}, "layers", "invalid_value"),
        ({"optimizer": "adam", "layers": True, "dropout": 0.1}, "layers", "invalid_value"),
        ({"optimizer": "adam", "layers": 3, "dropout": 0.15}, "dropout", "off_grid"),
    ]
    for params, name, error in cases:
        response = enqueue(params)
        assert response.status_code == 422, (params, response.text)
        assert response.json()["error"]["code"] == error, params
        assert response.json()["error"]["details"][0]["field"] == f"trials.0.params.{name}"


def test_enqueue_counts_against_the_budget(client: TestClient) -> None:
    create(client, external_study("b", n_trials=3))
    ask(client, "b")
    over = client.post(f"{API}/b/trials/enqueue", json={"trials": [{"params": PARAMS}] * 3})
    assert over.status_code == 409 and code(over) == "budget_exhausted"
    assert study(client, "b")["trial_counts"]["waiting"] == 0  # all or nothing
    fits = client.post(f"{API}/b/trials/enqueue", json={"trials": [{"params": PARAMS}] * 2})
    assert fits.status_code == 201
    # waiting trials are handed out even though the count is full
    assert ask(client, "b")["params"] == PARAMS
    assert ask(client, "b")["params"] == PARAMS
    assert code(client.post(f"{API}/b/trials/ask", json={})) == "budget_exhausted"


def test_enqueue_values_are_checked(client: TestClient) -> None:
    create(client, external_study("v", n_trials=5))
    for item, error in (
        ({"params": PARAMS, "values": [1.0, 2.0]}, "wrong_number_of_values"),
        ({"params": PARAMS, "value": 1.0, "values": [1.0]}, "validation_error"),
        ({"params": PARAMS, "value": "NaN"}, "non_finite_value"),
    ):
        response = client.post(f"{API}/v/trials/enqueue", json={"trials": [item]})
        assert response.status_code == 422 and code(response) == error, response.text
    assert client.post(f"{API}/v/trials/enqueue", json={"trials": []}).status_code == 422
    assert client.post(f"{API}/nope/trials/enqueue", json={"trials": [{"params": PARAMS}]}).status_code == 404


def test_ask_fixed_values_are_checked_by_the_same_rules(client: TestClient) -> None:
    create(client, external_study("fx", n_trials=5))
    pinned = ask(client, "fx", fixed={"beta1": 0.95})
    assert pinned["params"]["beta1"] == pytest.approx(0.95)
    for fixed, error in (({"beta1": 2.0}, "out_of_range"), ({"momentum": 0.9}, "unknown_parameter")):
        response = client.post(f"{API}/fx/trials/ask", json={"fixed": fixed})
        assert response.status_code == 422 and code(response) == error
        assert response.json()["error"]["details"][0]["field"] == f"fixed.{next(iter(fixed))}"


# ---- warm start and refine -----------------------------------------------------------------


def _finished_source(client: TestClient, name: str = "src") -> None:
    create(client, external_study(name, n_trials=6))
    for value in (0.1, 0.9, 0.5, 0.7, 0.3, 0.8):
        tell(client, name, ask(client, name)["number"], value)


def test_warm_start_enqueues_the_best_compatible_trials(client: TestClient) -> None:
    _finished_source(client)
    source = {t["number"]: t["params"] for t in client.get(f"{API}/src/trials").json()["items"]}
    best3 = [1, 5, 3]  # values 0.9, 0.8, 0.7
    lowest = min(best3, key=lambda n: source[n]["lr"])
    body = external_study("warm", n_trials=10)
    # a narrower lr range that leaves out one of the three best trials
    body["search_space"]["lr"] = {
        "type": "float",
        "low": source[lowest]["lr"] * 1.001,
        "high": 0.1,
        "scale": "log",
    }
    body["search_space"]["kind"] = {"type": "categorical", "choices": ["y"]}
    body["warm_start"] = {"from": "src", "top_k": 3}
    response = client.post(API, json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    # every source trial lacks `kind`, which this space needs: all are skipped
    assert created["warm_start"]["enqueued"] == 0 and created["warm_start"]["skipped"] == 3
    reasons = {r["number"]: r["reason"] for r in created["warm_start"]["reasons"]}
    assert reasons[lowest].startswith("params.lr: ")  # the first problem is named
    assert all(reasons[n].startswith("params.kind: missing") for n in best3 if n != lowest)
    del body["search_space"]["kind"]
    body["name"] = "warm2"
    created = create(client, body)
    fitting = [n for n in best3 if n != lowest]
    assert created["warm_start"]["from"] == "src"
    assert created["warm_start"]["enqueued"] == 2 and created["warm_start"]["skipped"] == 1
    assert created["warm_start"]["reasons"][0]["number"] == lowest
    assert created["warm_start"]["reasons"][0]["reason"].startswith("params.lr:")
    assert created["trial_counts"]["waiting"] == 2
    assert created["definition"]["warm_start"] == {"from": "src", "top_k": 3}
    handed = [ask(client, "warm2")["params"] for _ in fitting]
    assert handed == [source[n] for n in fitting]


def test_warm_start_from_an_unknown_study_is_422(client: TestClient) -> None:
    body = external_study("w2")
    body["warm_start"] = {"from": "nowhere"}
    response = client.post(API, json=body)
    assert response.status_code == 422 and code(response) == "unknown_study"
    assert response.json()["error"]["details"][0]["field"] == "warm_start.from"
    assert client.get(f"{API}/w2").status_code == 404
    body["warm_start"] = {"from": "w2"}
    assert client.post(API, json=body).status_code == 422


def test_warm_start_respects_the_budget_and_skips_duplicates(client: TestClient) -> None:
    _finished_source(client)
    body = external_study("tiny", n_trials=2)
    body["warm_start"] = {"from": "src", "top_k": 5}
    created = create(client, body)
    assert created["warm_start"]["enqueued"] == 2 and created["warm_start"]["skipped"] == 3
    assert created["trial_counts"]["waiting"] == 2


def test_refine_starts_from_the_top_trials(client: TestClient) -> None:
    _finished_source(client)
    refined = client.post(f"{API}/src/refine", json={"min_top": 2, "top_fraction": 0.1})
    assert refined.status_code == 201, refined.text
    body = refined.json()
    assert body["definition"]["warm_start"] == {"from": "src", "top_k": 2}
    assert body["warm_start"]["enqueued"] == 2 and body["trial_counts"]["waiting"] == 2
    source = {t["number"]: t["params"] for t in client.get(f"{API}/src/trials").json()["items"]}
    handed = [ask(client, body["name"])["params"] for _ in range(2)]
    assert [p["lr"] for p in handed] == pytest.approx([source[1]["lr"], source[5]["lr"]])


# ---- export, importances, delete, metric names ---------------------------------------------


def _multi(name: str) -> dict[str, Any]:
    body = external_study(name, n_trials=12)
    del body["direction"]
    body["directions"] = ["maximize", "minimize"]
    body["metric"] = ["accuracy", "latency"]
    return body


def test_export_csv_and_json_endpoint(client: TestClient) -> None:
    _finished_source(client)
    response = client.get(f"{API}/src/trials/export", params={"format": "csv"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert 'filename="src-trials.csv"' in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [float(r["value"]) for r in rows] == [0.1, 0.9, 0.5, 0.7, 0.3, 0.8]
    assert {"params.lr", "params.beta1", "params.dropout"} <= set(rows[0])
    as_json = client.get(f"{API}/src/trials/export", params={"format": "json"}).json()
    assert [t["number"] for t in as_json] == list(range(6))
    assert client.get(f"{API}/src/trials/export", params={"format": "xml"}).status_code == 422
    create(client, _multi("mo"))
    tell(client, "mo", ask(client, "mo")["number"], values=[0.9, 12.0], state="complete")
    rows = list(csv.DictReader(io.StringIO(client.get(f"{API}/mo/trials/export").text)))
    assert rows[0]["accuracy"] == "0.9" and rows[0]["latency"] == "12.0"
    assert client.get(f"{API}/nope/trials/export").status_code == 404


def test_importances_of_a_multi_objective_study_are_one_set_per_metric(client: TestClient) -> None:
    create(client, _multi("imo"))
    assert client.get(f"{API}/imo/importances").json() == {"importances": {"accuracy": {}, "latency": {}}}
    for _ in range(12):
        trial = ask(client, "imo")
        accuracy = -abs(math.log10(trial["params"]["lr"]) + 2)  # depends on lr only
        latency = trial["params"]["dropout"]  # depends on dropout only
        tell(client, "imo", trial["number"], values=[accuracy, latency], state="complete")
    sets = client.get(f"{API}/imo/importances").json()["importances"]
    assert set(sets) == {"accuracy", "latency"}
    assert set(sets["accuracy"]) == {"lr", "beta1", "dropout"}
    assert max(sets["accuracy"], key=sets["accuracy"].get) == "lr"
    assert max(sets["latency"], key=sets["latency"].get) == "dropout"


def test_delete_removes_the_study_its_trials_and_their_files(
    client: TestClient, db_url: str, settings: Any
) -> None:
    create(client, external_study("del", n_trials=3))
    number = ask(client, "del")["number"]
    upload = client.post(
        f"{API}/del/trials/{number}/artifacts", params={"filename": "checkpoint.pt"}, content=b"weights"
    )
    assert upload.status_code == 201
    files = [p for p in Path(settings.artifact_dir).rglob("*") if p.is_file()]
    assert len(files) == 1
    assert client.delete(f"{API}/del").status_code == 204
    assert [p for p in Path(settings.artifact_dir).rglob("*") if p.is_file()] == []
    with pytest.raises(KeyError):
        optuna.load_study(study_name="del", storage=db_url)


def test_metric_names_reach_optuna(client: TestClient, db_url: str) -> None:
    create(client, {**external_study("named"), "metric": "val_accuracy"})
    create(client, _multi("named2"))
    assert optuna.load_study(study_name="named", storage=db_url).metric_names == ["val_accuracy"]
    assert optuna.load_study(study_name="named2", storage=db_url).metric_names == ["accuracy", "latency"]


def test_definition_edits_reach_a_process_with_a_cached_definition(client: TestClient, db_url: str) -> None:
    """Another server process (its own Database and definition cache) sees a PATCH at once."""
    create(client, external_study("cache", n_trials=1))
    other = Database(db_url)
    try:
        trials.ask(other, "cache", policy=POLICY)  # parses and caches the definition with n_trials 1
        assert patch(client, "cache", {"budget": {"n_trials": 2}}).status_code == 200
        assert trials.ask(other, "cache", policy=POLICY).number == 1
    finally:
        other.dispose()


def test_warm_start_from_a_multi_objective_study_takes_the_front_first(client: TestClient) -> None:
    create(client, _multi("msrc"))
    scores = [(0.9, 5.0), (0.5, 1.0), (0.4, 6.0), (0.8, 2.0)]  # front: 0, 1, 3; trial 2 is dominated
    for accuracy, latency in scores:
        number = ask(client, "msrc")["number"]
        tell(client, "msrc", number, state="complete", values=[accuracy, latency])
    body = {**external_study("mwarm", n_trials=10), "warm_start": {"from": "msrc", "top_k": 3}}
    created = create(client, body)
    assert created["warm_start"]["enqueued"] == 3
    source = {t["number"]: t["params"] for t in client.get(f"{API}/msrc/trials").json()["items"]}
    handed = [ask(client, "mwarm")["params"] for _ in range(3)]
    assert handed == [source[0], source[1], source[3]]
