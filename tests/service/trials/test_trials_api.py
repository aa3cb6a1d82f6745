"""REST tests of the trial lifecycle: every endpoint and error code (SQLite and PostgreSQL)."""

from __future__ import annotations

import math
import time

import optuna
import pytest
from fastapi.testclient import TestClient

from tests.service.helpers import POLICY, external_study

API = "/api/v1/studies"


def create(client: TestClient, **kwargs) -> str:
    body = external_study(**kwargs)
    response = client.post(API, json=body)
    assert response.status_code == 201, response.text
    return body["name"]


def ask(client: TestClient, name: str, **body) -> dict:
    response = client.post(f"{API}/{name}/trials/ask", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def error_code(response) -> str:
    return response.json()["error"]["code"]


def test_ask_report_tell_round_trip(client: TestClient, db_url: str) -> None:
    name = create(client)
    assignment = ask(client, name, worker_id="w1")
    assert assignment["study"] == name and assignment["number"] == 0
    params = assignment["params"]
    assert set(params) == {"lr", "beta1", "dropout"}
    assert 0.8 <= params["beta1"] <= 0.999
    assert client.get(f"{API}/{name}").json()["state"] == "running"
    prune = client.post(f"{API}/{name}/trials/0/report", json={"step": 1, "value": 0.5})
    assert prune.json() == {"should_prune": False}
    assert client.post(f"{API}/{name}/trials/0/heartbeat", json={}).status_code == 204
    assert client.post(f"{API}/{name}/trials/0/heartbeat").status_code == 204
    told = client.post(f"{API}/{name}/trials/0/tell", json={"state": "complete", "value": 0.9}).json()
    assert told["state"] == "complete" and told["value"] == 0.9
    assert told["params"] == params
    assert told["intermediate_values"] == {"1": 0.5}
    assert told["worker_id"] == "w1"
    # Optuna sees the encoded parameter and the decoded user attribute (for the dashboard).
    trial = optuna.load_study(study_name=name, storage=db_url).trials[0]
    assert math.isclose(1 - trial.params["one_minus_beta1"], params["beta1"])
    assert math.isclose(trial.user_attrs["beta1"], params["beta1"])
    detail = client.get(f"{API}/{name}/trials/0").json()
    assert detail["intermediate_values"] == {"1": 0.5}
    best = client.get(f"{API}/{name}/best").json()
    assert best["number"] == 0 and best["params"]["beta1"] == params["beta1"]
    study = client.get(f"{API}/{name}").json()
    assert study["best"]["number"] == 0 and study["trial_counts"]["complete"] == 1


def test_tell_is_idempotent_and_final(client: TestClient) -> None:
    name = create(client)
    ask(client, name)
    url = f"{API}/{name}/trials/0/tell"
    first = client.post(url, json={"state": "complete", "value": 1.5})
    again = client.post(url, json={"state": "complete", "value": 1.5})
    assert again.status_code == 200 and again.json() == first.json()
    other = client.post(url, json={"state": "complete", "value": 2.0})
    assert other.status_code == 409 and error_code(other) == "trial_finished"
    assert other.json()["error"]["message"] == f"trial 0 of {name!r} already finished as complete"
    pruned = client.post(url, json={"state": "pruned"})
    assert pruned.status_code == 409 and error_code(pruned) == "trial_finished"
    report = client.post(f"{API}/{name}/trials/0/report", json={"step": 2, "value": 1.0})
    assert report.status_code == 409 and error_code(report) == "trial_finished"
    beat = client.post(f"{API}/{name}/trials/0/heartbeat")
    assert beat.status_code == 409 and error_code(beat) == "trial_finished"


def test_ask_with_request_id_is_idempotent(client: TestClient) -> None:
    name = create(client)
    first = ask(client, name, request_id="req-1")
    second = ask(client, name, request_id="req-1")
    assert first == second
    assert ask(client, name, request_id="req-2")["number"] == 1


def test_budget_exhausted_and_completed(client: TestClient) -> None:
    name = create(client, n_trials=2)
    for _ in range(2):
        ask(client, name)
    response = client.post(f"{API}/{name}/trials/ask", json={})
    assert response.status_code == 409 and error_code(response) == "budget_exhausted"
    client.post(f"{API}/{name}/trials/0/tell", json={"state": "complete", "value": 1.0})
    assert client.get(f"{API}/{name}").json()["state"] == "running"
    client.post(f"{API}/{name}/trials/1/tell", json={"state": "pruned"})
    assert client.get(f"{API}/{name}").json()["state"] == "completed"
    assert error_code(client.post(f"{API}/{name}/trials/ask", json={})) == "budget_exhausted"


def test_max_parallel_is_429_with_retry_after(client: TestClient) -> None:
    name = create(client, n_trials=5, max_parallel=1)
    ask(client, name)
    response = client.post(f"{API}/{name}/trials/ask", json={})
    assert response.status_code == 429
    assert error_code(response) == "max_parallel_reached"
    assert int(response.headers["Retry-After"]) >= 1
    client.post(f"{API}/{name}/trials/0/tell", json={"state": "complete", "value": 1.0})
    assert ask(client, name)["number"] == 1


def test_paused_study_refuses_asks_but_running_trials_finish(client: TestClient) -> None:
    name = create(client, n_trials=5)
    ask(client, name)
    client.post(f"{API}/{name}/pause")
    response = client.post(f"{API}/{name}/trials/ask", json={})
    assert response.status_code == 409 and error_code(response) == "study_paused"
    assert client.post(f"{API}/{name}/trials/0/report", json={"step": 0, "value": 0.1}).status_code == 200
    assert (
        client.post(f"{API}/{name}/trials/0/tell", json={"state": "complete", "value": 0.1}).status_code
        == 200
    )
    client.post(f"{API}/{name}/resume")
    assert ask(client, name)["number"] == 1


def test_precedence_paused_before_budget(client: TestClient) -> None:
    name = create(client, n_trials=1)
    ask(client, name)
    client.post(f"{API}/{name}/pause")
    assert error_code(client.post(f"{API}/{name}/trials/ask", json={})) == "study_paused"


def test_failed_trials_retry_then_fail_the_study(client: TestClient) -> None:
    name = create(client, n_trials=10, max_retries=1, max_failed_trials=2)
    first = ask(client, name)
    told = client.post(f"{API}/{name}/trials/0/tell", json={"state": "fail", "reason": "CUDA out of memory"})
    assert told.json()["fail_reason"] == "CUDA out of memory"
    retry = ask(client, name)
    assert retry["retry_of"] == 0 and retry["params"] == first["params"]
    client.post(f"{API}/{name}/trials/{retry['number']}/tell", json={"state": "fail"})
    # max_retries=1: no second retry of trial 0; a fresh trial is sampled instead.
    fresh = ask(client, name)
    assert fresh["retry_of"] is None and fresh["params"] != first["params"]
    client.post(f"{API}/{name}/trials/{fresh['number']}/tell", json={"state": "fail"})
    assert client.get(f"{API}/{name}").json()["state"] == "failed"
    response = client.post(f"{API}/{name}/trials/ask", json={})
    assert response.status_code == 409 and error_code(response) == "study_failed"


def test_waiting_trials_are_handed_out_even_when_budget_is_full(client: TestClient, db_url: str) -> None:
    name = create(client, n_trials=2)
    ask(client, name)
    ask(client, name)
    study = optuna.load_study(study_name=name, storage=db_url)
    study.enqueue_trial({"lr": 0.01, "one_minus_beta1": 0.1, "dropout": 0.2})
    enqueued = ask(client, name)
    assert enqueued["params"] == {"lr": 0.01, "beta1": pytest.approx(0.9), "dropout": 0.2}
    assert error_code(client.post(f"{API}/{name}/trials/ask", json={})) == "budget_exhausted"


def test_budget_counts_trials_created_through_optuna(client: TestClient, db_url: str) -> None:
    name = create(client, n_trials=2)
    study = optuna.load_study(study_name=name, storage=db_url)
    trial = study.ask()
    study.tell(trial, 1.0)
    ask(client, name)
    assert error_code(client.post(f"{API}/{name}/trials/ask", json={})) == "budget_exhausted"


def test_lease_lapses_is_reaped_and_retried(settings, db) -> None:
    from caviar.service.api import create_app

    fast = settings.model_copy(update={"heartbeat_interval_s": 0.2, "reaper_interval_s": 0.1})
    with TestClient(create_app(fast, db=db)) as client:
        name = create(client, n_trials=3)
        lost = ask(client, name, worker_id="dead")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = client.get(f"{API}/{name}/trials/0").json()["state"]
            if state == "fail":
                break
            time.sleep(0.05)
        trial = client.get(f"{API}/{name}/trials/0").json()
        assert trial["state"] == "fail" and "lease expired" in trial["fail_reason"]
        beat = client.post(f"{API}/{name}/trials/0/heartbeat")
        assert beat.status_code == 409 and error_code(beat) == "lease_lost"
        report = client.post(f"{API}/{name}/trials/0/report", json={"step": 1, "value": 0.3})
        assert error_code(report) == "lease_lost"
        tell = client.post(f"{API}/{name}/trials/0/tell", json={"state": "complete", "value": 1.0})
        assert tell.status_code == 409 and error_code(tell) == "lease_lost"
        retry = ask(client, name)
        assert retry["retry_of"] == 0 and retry["params"] == lost["params"]


def test_heartbeats_keep_the_lease(settings, db) -> None:
    from caviar.service.api import create_app

    fast = settings.model_copy(update={"heartbeat_interval_s": 0.3, "reaper_interval_s": 0.1})
    with TestClient(create_app(fast, db=db)) as client:
        name = create(client, n_trials=3)
        ask(client, name)
        for _ in range(8):
            assert client.post(f"{API}/{name}/trials/0/heartbeat").status_code == 204
            time.sleep(0.15)
        assert client.get(f"{API}/{name}/trials/0").json()["state"] == "running"


def test_trial_timeout_fails_the_trial(client: TestClient, db) -> None:
    from datetime import timedelta

    from caviar.service.trials import reap
    from caviar.storage import utcnow

    name = create(client, n_trials=3, trial_timeout_s=1)
    ask(client, name)
    client.post(f"{API}/{name}/trials/0/heartbeat")
    assert reap(db, now=utcnow() + timedelta(seconds=2)) == 1
    assert client.get(f"{API}/{name}/trials/0").json()["fail_reason"] == "trial timeout"


def test_pruning_reaches_rest_clients(client: TestClient) -> None:
    body = external_study("pr", n_trials=10)
    body["pruner"] = {"type": "median", "options": {"n_startup_trials": 2, "n_warmup_steps": 0}}
    client.post(API, json=body)
    for number in range(3):
        ask(client, "pr")
        for step in range(5):
            client.post(f"{API}/pr/trials/{number}/report", json={"step": step, "value": 0.8 + 0.02 * step})
        client.post(f"{API}/pr/trials/{number}/tell", json={"state": "complete", "value": 0.9})
    ask(client, "pr")
    answers = [
        client.post(f"{API}/pr/trials/3/report", json={"step": step, "value": 0.1}).json()["should_prune"]
        for step in range(3)
    ]
    assert answers[-1] is True
    pruned = client.post(f"{API}/pr/trials/3/tell", json={"state": "pruned"}).json()
    assert pruned["state"] == "pruned"


def test_a_study_that_names_no_pruner_gets_asha(client: TestClient) -> None:
    """The default pruner is ``asha``: the API shows its rungs, and reports at a rung step (1, 3, 9, ...)
    go on only in the top third of the values recorded at that rung (the first ones: only the best)."""
    body = external_study("asha", n_trials=10)
    del body["pruner"]
    study = client.post(API, json=body).json()
    assert study["definition"]["pruner"] == {
        "type": "asha",
        "options": {"min_resource": 1, "reduction_factor": 3, "min_early_stopping_rate": 0},
    }
    for _ in range(3):
        ask(client, "asha")

    def report(number: int, step: int, value: float) -> bool:
        answer = client.post(f"{API}/asha/trials/{number}/report", json={"step": step, "value": value})
        assert answer.status_code == 200, answer.text
        return bool(answer.json()["should_prune"])

    assert [report(n, 0, 0.1) for n in range(3)] == [False] * 3  # step 0: no rung yet
    assert report(0, 1, 0.8) is False  # the first value at rung 0 goes on
    assert report(1, 1, 0.5) is True  # below it
    assert report(2, 1, 0.9) is False  # the best so far
    assert report(0, 2, 0.8) is False  # between rungs


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ({"state": "complete", "value": "NaN"}, "non_finite_value", "values: values must be finite numbers"),
        (
            {"state": "complete", "value": "Infinity"},
            "non_finite_value",
            "values: values must be finite numbers",
        ),
        (
            {"state": "complete", "values": [1.0, 2.0]},
            "wrong_number_of_values",
            "values: the study has 1 objective(s), got 2 value(s)",
        ),
        ({"state": "complete"}, "validation_error", "value: a complete trial needs value (or values)"),
        ({"state": "exploded"}, "validation_error", "state: "),
        ({"state": "pruned", "value": 1.0}, "validation_error", "values: a pruned trial takes no values"),
    ],
)
def test_bad_tells_are_422_and_write_nothing(client: TestClient, body: dict, code: str, message: str) -> None:
    name = create(client)
    ask(client, name)
    response = client.post(f"{API}/{name}/trials/0/tell", json=body)
    assert response.status_code == 422, response.text
    assert error_code(response) == code
    assert response.json()["error"]["message"].startswith(message)  # names the field
    assert client.get(f"{API}/{name}/trials/0").json()["state"] == "running"


def test_nan_literal_in_raw_json_is_refused(client: TestClient) -> None:
    name = create(client)
    ask(client, name)
    for path, raw in [
        ("tell", b'{"state": "complete", "value": NaN}'),
        ("report", b'{"step": 1, "value": NaN}'),
    ]:
        response = client.post(
            f"{API}/{name}/trials/0/{path}", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, response.text
    assert client.get(f"{API}/{name}/trials/0").json()["intermediate_values"] == {}


def test_unknown_trial_and_study_are_404(client: TestClient) -> None:
    name = create(client)
    for method, path in [
        ("post", f"{API}/{name}/trials/7/heartbeat"),
        ("get", f"{API}/{name}/trials/7"),
        ("post", f"{API}/missing/trials/ask"),
        ("get", f"{API}/missing/trials"),
    ]:
        response = client.request(method, path, json={} if method == "post" else None)
        assert response.status_code == 404, path
    report = client.post(f"{API}/{name}/trials/7/report", json={"step": 1, "value": 1.0})
    assert report.status_code == 404 and error_code(report) == "trial_not_found"
    assert error_code(client.get(f"{API}/{name}/best")) == "no_completed_trials"


def test_report_on_multi_objective_study_is_422(client: TestClient) -> None:
    body = external_study("mo")
    body.pop("direction")
    body["directions"] = ["maximize", "minimize"]
    body["metric"] = ["acc", "latency"]
    client.post(API, json=body)
    ask(client, "mo")
    response = client.post(f"{API}/mo/trials/0/report", json={"step": 1, "value": 1.0})
    assert response.status_code == 422 and error_code(response) == "multi_objective_report"
    assert response.json()["error"]["message"] == (
        "report: intermediate values are for single-objective studies only (as in Optuna)"
    )
    batch = client.post(
        f"{API}/mo/trials/reports", json={"reports": [{"number": 0, "step": 1, "value": 1.0}]}
    )
    assert batch.status_code == 422 and error_code(batch) == "multi_objective_report"
    assert client.post(f"{API}/mo/trials/0/tell", json={"state": "complete", "value": 1.0}).status_code == 422
    assert (
        client.post(f"{API}/mo/trials/0/tell", json={"state": "complete", "values": [0.9, 3.0]}).status_code
        == 200
    )
    ask(client, "mo")
    client.post(f"{API}/mo/trials/1/tell", json={"state": "complete", "values": [0.8, 1.0]})
    ask(client, "mo")
    client.post(f"{API}/mo/trials/2/tell", json={"state": "complete", "values": [0.7, 2.0]})
    front = client.get(f"{API}/mo/best").json()
    assert [t["number"] for t in front["trials"]] == [0, 1]
    assert [t["number"] for t in client.get(f"{API}/mo").json()["best"]["trials"]] == [0, 1]


def test_list_trials_filters_and_paginates(client: TestClient) -> None:
    name = create(client, n_trials=10)
    for number in range(5):
        ask(client, name)
        if number % 2 == 0:
            client.post(
                f"{API}/{name}/trials/{number}/tell", json={"state": "complete", "value": float(number)}
            )
    page = client.get(f"{API}/{name}/trials", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 5 and [t["number"] for t in page["items"]] == [1, 2]
    running = client.get(f"{API}/{name}/trials", params={"state": "running"}).json()
    assert [t["number"] for t in running["items"]] == [1, 3]
    assert client.get(f"{API}/{name}/trials", params={"limit": 1001}).status_code == 422


def test_importances_and_refine(client: TestClient) -> None:
    name = create(client, n_trials=12)
    assert client.get(f"{API}/{name}/importances").json() == {"importances": {}}
    for number in range(12):
        params = ask(client, name)["params"]
        value = -abs(math.log10(params["lr"]) + 2)  # best near lr = 1e-2
        client.post(f"{API}/{name}/trials/{number}/tell", json={"state": "complete", "value": value})
    importances = client.get(f"{API}/{name}/importances").json()["importances"]
    assert set(importances) == {"lr", "beta1", "dropout"}
    refined = client.post(f"{API}/{name}/refine", json={"top_fraction": 0.25, "n_trials": 5})
    assert refined.status_code == 201, refined.text
    study = refined.json()
    assert study["name"] == f"{name}-refined-1"
    space = study["definition"]["search_space"]
    assert 1e-4 <= space["lr"]["low"] < space["lr"]["high"] <= 1e-1
    assert space["lr"]["high"] / space["lr"]["low"] < 1e3  # narrower than the original three decades
    assert 0.8 <= space["beta1"]["low"] < space["beta1"]["high"] <= 0.999
    assert study["definition"]["budget"]["n_trials"] == 5
    assert client.post(f"{API}/{name}/refine").json()["name"] == f"{name}-refined-2"


def test_a_trial_orphaned_mid_ask_is_recovered(client: TestClient, db) -> None:
    """A crash between creating the trial and writing its lease (a database restart) is recovered."""
    from caviar.service.store import load_record
    from caviar.service.trials import reap
    from caviar.service.trials.lifecycle import _start_trial

    name = create(client, n_trials=2)
    record = load_record(db, name)
    _start_trial(db, record, [], "crashed-worker")  # the ask died right here
    ask(client, name)
    assert error_code(client.post(f"{API}/{name}/trials/ask", json={})) == "budget_exhausted"
    assert reap(db) == 1
    orphan = client.get(f"{API}/{name}/trials/0").json()
    assert orphan["state"] == "fail" and orphan["fail_reason"] == "lost while being handed out"
    assert ask(client, name)["retry_of"] == 0


def test_a_study_created_after_a_deletion_gets_its_own_handle(client: TestClient) -> None:
    # SQLite hands the id of the newest study, once deleted, to the next one; the hyperband
    # pruner looks the study up by name, so a handle cached by id alone named a deleted study
    for name in ("first", "second"):
        body = external_study(name)
        body["pruner"] = {"type": "hyperband"}
        assert client.post(API, json=body).status_code == 201
        assert ask(client, name)["study"] == name
        assert client.delete(f"{API}/{name}").status_code == 204


# ---- found by mutation testing (docs/mutation-testing.md) ---------------------------------


def test_a_hand_back_is_retried_without_using_a_retry_and_is_no_failure(client: TestClient) -> None:
    name = create(client, n_trials=3, max_retries=0, max_failed_trials=0)
    first = ask(client, name, worker_id="w1")
    other = client.post(f"{API}/{name}/trials/0/release", json={"worker_id": "w2", "reason": "x"})
    assert other.status_code == 200  # no tokens: any caller may act on any trial
    assert other.json()["state"] == "fail" and other.json()["fail_reason"] == "x"
    assert client.get(f"{API}/{name}").json()["state"] == "running"  # a hand-back is no failure
    again = client.post(f"{API}/{name}/trials/0/release")  # not running any more: nothing happens
    assert again.status_code == 200 and again.json()["fail_reason"] == "x"
    tell = client.post(f"{API}/{name}/trials/0/tell", json={"state": "complete", "value": 1.0})
    assert tell.status_code == 409 and error_code(tell) == "lease_lost"
    assert tell.json()["error"]["message"] == f"trial 0 of {name!r} lost its lease; its retry runs instead"
    beat = client.post(f"{API}/{name}/trials/0/heartbeat")
    assert beat.status_code == 409 and error_code(beat) == "lease_lost"
    assert "lost its lease (x)" in beat.json()["error"]["message"]  # the hand-back's reason
    retry = ask(client, name)  # max_retries=0, and still re-queued: the attempt was not used up
    assert retry["retry_of"] == 0 and retry["params"] == first["params"] and retry["number"] == 1
    assert client.post(f"{API}/{name}/trials/1/release").json()["state"] == "fail"
    assert ask(client, name)["retry_of"] == 1


def test_failures_up_to_max_failed_trials_keep_the_study_running(client: TestClient) -> None:
    name = create(client, n_trials=5, max_retries=0, max_failed_trials=1)
    ask(client, name)
    assert client.post(f"{API}/{name}/trials/0/release").status_code == 200  # a hand-back: no failure
    assert ask(client, name)["retry_of"] == 0
    assert client.post(f"{API}/{name}/trials/1/tell", json={"state": "fail"}).status_code == 200
    assert client.get(f"{API}/{name}").json()["state"] == "running"  # one failure of one allowed
    ask(client, name)
    assert client.post(f"{API}/{name}/trials/2/tell", json={"state": "fail"}).status_code == 200
    assert client.get(f"{API}/{name}").json()["state"] == "failed"


def test_request_ids_are_per_study(client: TestClient) -> None:
    first, second = create(client, name="a"), create(client, name="b")
    ask(client, first)
    assert ask(client, first, request_id="r")["number"] == 1
    answer = ask(client, second, request_id="r")
    assert answer["study"] == second and answer["number"] == 0


def test_a_repeated_ask_waits_for_the_first_then_answers_409(client: TestClient, db, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from caviar.service import store
    from caviar.service.errors import Conflict
    from caviar.service.store import load_record
    from caviar.service.trials import lifecycle

    monkeypatch.setattr(lifecycle, "REPLAY_WAIT_S", 0.3)
    name = create(client)
    ask(client, name, request_id="r")
    tid = store.trial_id(db, load_record(db, name), 0)
    db.optuna.set_trial_system_attr(tid, store.READY, False)  # as if the first ask still samples
    start = time.monotonic()
    with pytest.raises(Conflict) as raised:
        lifecycle.ask(db, name, request_id="r", policy=POLICY)
    assert 0.3 <= time.monotonic() - start < 1.0
    assert raised.value.code == "ask_in_progress" and raised.value.retry_after_s == 1
    assert raised.value.message == f"the ask 'r' of {name!r} is still being answered; repeat it shortly"
    assert client.post(f"{API}/{name}/trials/0/tell", json={"state": "pruned"}).status_code == 200
    start = time.monotonic()
    assert lifecycle.ask(db, name, request_id="r", policy=POLICY).number == 0  # finished: answered at once
    assert time.monotonic() - start < 0.3


def test_the_reaper_counts_what_it_reaped_and_records_why(client: TestClient, db) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from caviar.service import store
    from caviar.service.store import definition_of, load_record
    from caviar.service.trials import leases
    from caviar.storage import utcnow

    name = create(client, n_trials=5)
    ask(client, name)
    ask(client, name)
    record = load_record(db, name)
    told_id = store.trial_id(db, record, 1)
    db.optuna.set_trial_state_values(told_id, optuna.trial.TrialState.COMPLETE, [1.0])  # a tell won the race
    lapsed_id = store.trial_id(db, record, 0)
    now = utcnow()
    assert leases._reap_one(db, record, definition_of(record), lapsed_id, now) == 0  # not due
    later = now + timedelta(hours=1)
    assert leases.reap(db, now=later) == 1
    reaped = store.lease_of(db, lapsed_id)
    assert reaped is not None and (reaped.status, reaped.reason) == ("reaped", "lease expired (no heartbeat)")
    assert client.get(f"{API}/{name}/trials/0").json()["fail_reason"] == "lease expired (no heartbeat)"
    finished = store.lease_of(db, told_id)
    assert finished is not None and finished.status == "finished"
    assert client.get(f"{API}/{name}/trials/1").json()["state"] == "complete"
    assert leases.reap(db, now=later) == 0
    beat = client.post(f"{API}/{name}/trials/0/heartbeat").json()["error"]
    assert (beat["code"], beat["message"]) == (
        "lease_lost",
        f"trial 0 of {name!r} lost its lease (lease expired (no heartbeat)); its retry runs instead",
    )
    beat = client.post(f"{API}/{name}/trials/1/heartbeat").json()["error"]
    assert (beat["code"], beat["message"]) == ("trial_finished", f"trial 1 of {name!r} is already finished")
    assert leases._reap_one(db, record, definition_of(record), lapsed_id, later) == 0  # reaped already
    assert store.lease_of(db, lapsed_id).status == "reaped"  # type: ignore[union-attr]
    counts = client.get(f"{API}/{name}").json()["trial_counts"]
    assert counts["waiting"] == 1  # one retry, of the reaped trial only


def test_a_worker_id_is_a_label_not_proof_of_holding_a_trial(client: TestClient, db) -> None:  # type: ignore[no-untyped-def]
    from caviar.service.errors import Conflict
    from caviar.service.trials import leases, lifecycle, reports

    name = create(client, n_trials=5)
    ask(client, name, worker_id="w1")
    ask(client, name)
    # without proof (the trial's credential) or write scope, no worker id acts: not even the asker's
    unproven = [leases.Caller("w1", any_trial=False), leases.Caller("w2", any_trial=False)]
    for act in (
        lambda caller: leases.heartbeat(db, name, 0, caller=caller, policy=POLICY),
        lambda caller: reports.report(db, name, 0, 1, 0.5, caller=caller, policy=POLICY),
        lambda caller: leases.release(db, name, 0, caller=caller),
        lambda caller: lifecycle.tell(db, name, 0, "pruned", caller=caller),
    ):
        for caller in unproven:
            with pytest.raises(Conflict) as raised:
                act(caller)
            assert raised.value.code == "not_your_trial"
            assert str(raised.value) == (
                f"trial 0 of {name!r} is not yours: send the credential its ask answered "
                "(header X-Caviar-Lease), or use a token with write scope"
            )
    assert client.get(f"{API}/{name}/trials/0").json()["state"] == "running"
    proven = leases.Caller("w2", any_trial=True)  # the trial's credential, or write scope: any label
    leases.heartbeat(db, name, 0, caller=proven, policy=POLICY)
    leases.heartbeat(db, name, 1, caller=proven, policy=POLICY)
    assert lifecycle.tell(db, name, 0, "pruned", caller=proven).state == "pruned"


def test_a_tell_stores_the_user_attributes_it_carries(client: TestClient) -> None:
    name = create(client)
    ask(client, name)
    body = {"state": "complete", "value": 0.5, "user_attrs": {"epochs": 7, "note": "ok"}}
    told = client.post(f"{API}/{name}/trials/0/tell", json=body).json()
    assert told["user_attrs"]["epochs"] == 7 and told["user_attrs"]["note"] == "ok"
    assert client.get(f"{API}/{name}/trials/0").json()["user_attrs"]["epochs"] == 7


def test_the_reaper_recovers_orphans_in_every_live_study_and_counts_them(client: TestClient, db) -> None:  # type: ignore[no-untyped-def]
    from caviar.service.store import load_record
    from caviar.service.trials import reap
    from caviar.service.trials.lifecycle import _start_trial

    done = create(client, name="done", n_trials=5)  # no running trial at all
    ask(client, done)
    client.post(f"{API}/{done}/trials/0/tell", json={"state": "complete", "value": 1.0})
    ask(client, create(client, name="leased", n_trials=5))  # running trials, all with their lease
    for state in ("running", "paused", "stopping"):
        name = create(client, name=state, n_trials=5)
        ask(client, name)
        for _ in range(2):
            _start_trial(db, load_record(db, name), [], "crashed-worker")  # asks that died half-way
        if state == "paused":
            assert client.post(f"{API}/{name}/pause").status_code == 200
        if state == "stopping":
            assert client.post(f"{API}/{name}/stop", json={}).status_code == 200
        assert client.get(f"{API}/{name}").json()["state"] == state
    assert reap(db) == 6
    for state in ("running", "paused", "stopping"):
        trials = {t["number"]: t for t in client.get(f"{API}/{state}/trials").json()["items"]}
        assert trials[0]["state"] == "running"  # the leased one is left alone
        assert [trials[n]["fail_reason"] for n in (1, 2)] == ["lost while being handed out"] * 2
    assert client.get(f"{API}/leased/trials/0").json()["state"] == "running"
    assert reap(db) == 0


def test_the_reaper_loads_no_trial_while_every_running_trial_holds_its_lease(
    client: TestClient, db, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from caviar.service.store import load_record
    from caviar.service.trials import reap
    from caviar.service.trials.lifecycle import _start_trial

    name = create(client, n_trials=50)
    for _ in range(20):
        ask(client, name)
    loads: list[int] = []
    real = db.optuna.get_all_trials

    def counted(study_id, *args, **kwargs):  # type: ignore[no-untyped-def]
        loads.append(study_id)
        return real(study_id, *args, **kwargs)

    monkeypatch.setattr(db.optuna, "get_all_trials", counted)
    assert reap(db) == 0
    assert loads == []  # one read of ids found no candidate: no trial was loaded
    _start_trial(db, load_record(db, name), [], "crashed-worker")  # an ask that died half-way
    assert reap(db) == 1
    assert loads == [load_record(db, name).optuna_study_id]  # only now, and only that study
    assert client.get(f"{API}/{name}/trials/20").json()["fail_reason"] == "lost while being handed out"


def test_an_orphan_seen_before_its_lease_landed_is_left_alone(client: TestClient, db, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from caviar.service.store import load_record, trial_id
    from caviar.service.trials import leases, reap
    from caviar.service.trials.lifecycle import _start_trial

    name = create(client, n_trials=5)
    ask(client, name)  # trial 0: its lease exists, but the first (unlocked) reads missed it
    record = load_record(db, name)
    _start_trial(db, record, [], "crashed-worker")  # trial 1: a real orphan
    both = [trial_id(db, record, 0), trial_id(db, record, 1)]
    monkeypatch.setattr(leases, "unleased_running", lambda db, states: {record.id: both})
    monkeypatch.setattr(leases, "leases_for", lambda db, ids: {})
    assert reap(db) == 1
    assert client.get(f"{API}/{name}/trials/0").json()["state"] == "running"
    assert client.get(f"{API}/{name}/trials/1").json()["state"] == "fail"


def test_the_reaper_ends_a_study_past_its_deadline_by_the_clock_it_is_given(client: TestClient, db) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from caviar.service.trials import reap
    from caviar.storage import utcnow

    for name in ("running", "paused"):
        create(client, name=name, n_trials=5, max_duration_s=600)
        ask(client, name)
    assert client.post(f"{API}/paused/pause").status_code == 200
    reap(db, now=utcnow() + timedelta(seconds=30))
    assert [client.get(f"{API}/{n}").json()["state"] for n in ("running", "paused")] == ["running", "paused"]
    reap(db, now=utcnow() + timedelta(hours=1))
    for name in ("running", "paused"):
        study = client.get(f"{API}/{name}").json()
        assert study["state"] == "stopped"
        assert study["stop_reason"].startswith("deadline: budget.max_duration_s=600")


def test_a_stopping_study_says_why_to_the_heartbeats_of_its_trials(client: TestClient) -> None:
    name = create(client)
    ask(client, name)
    assert client.post(f"{API}/{name}/stop", json={"reason": "enough"}).status_code == 200
    beat = client.post(f"{API}/{name}/trials/0/heartbeat")
    assert beat.status_code == 409 and error_code(beat) == "study_stopped"
    assert beat.json()["error"]["message"] == f"study {name!r} is stopping (stopped by request: enough)"


def age_lease(db, trial_id: int, seconds_left: float) -> None:  # type: ignore[no-untyped-def]
    """Make a lease expire ``seconds_left`` from now (as if its last renewal were long ago)."""
    from datetime import timedelta

    from sqlalchemy import update

    from caviar.storage import TrialLease, utcnow

    with db.session() as session, session.begin():
        session.execute(
            update(TrialLease)
            .where(TrialLease.trial_id == trial_id)
            .values(expires_at=utcnow() + timedelta(seconds=seconds_left))
        )


def test_a_report_and_a_heartbeat_renew_their_own_lease_only(client: TestClient, db) -> None:  # type: ignore[no-untyped-def]
    from caviar.service import store
    from caviar.service.store import load_record

    name = create(client)  # the client's heartbeat interval is 30 s: a lease lasts 60 s
    ask(client, name)
    ask(client, name)
    record = load_record(db, name)
    ids = [store.trial_id(db, record, n) for n in (0, 1)]

    def expiries() -> list:  # type: ignore[type-arg]
        return [store.lease_of(db, i).expires_at for i in ids]  # type: ignore[union-attr]

    for trial in ids:
        age_lease(db, trial, 25)  # under one heartbeat interval left: a report renews it
    before = expiries()
    assert client.post(f"{API}/{name}/trials/0/report", json={"step": 1, "value": 0.5}).status_code == 200
    after = expiries()
    assert after[0] > before[0] and after[1] == before[1]
    time.sleep(0.01)
    assert client.post(f"{API}/{name}/trials/1/heartbeat").status_code == 204
    again = expiries()
    assert again[1] > after[1] and again[0] == after[0]


def test_a_report_whose_lease_is_reaped_before_it_renews_is_lease_lost(
    client: TestClient, db, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from caviar.service.trials import leases, reports
    from caviar.storage import utcnow

    name = create(client)
    ask(client, name)
    age_lease(db, trial_id_of(db, name, 0), 25)  # under one heartbeat interval left: the report renews
    renew = reports.renew

    def reaped_first(db_, trial_id, policy):  # type: ignore[no-untyped-def]
        leases.reap(db_, now=utcnow() + timedelta(hours=1))  # the reaper runs between check and renewal
        return renew(db_, trial_id, policy)

    monkeypatch.setattr(reports, "renew", reaped_first)
    response = client.post(f"{API}/{name}/trials/0/report", json={"step": 1, "value": 0.5})
    assert response.status_code == 409 and error_code(response) == "lease_lost"
    assert client.get(f"{API}/{name}/trials/0").json()["intermediate_values"] == {}


def trial_id_of(db, name: str, number: int) -> int:  # type: ignore[no-untyped-def]
    from caviar.service import store

    return store.trial_id(db, store.load_record(db, name), number)


def test_a_report_leaves_a_fresh_lease_alone_and_renews_it_past_half_its_period(
    client: TestClient, db
) -> None:  # type: ignore[no-untyped-def]
    from caviar.service import store

    name = create(client)  # a lease lasts 60 s
    ask(client, name)
    trial = trial_id_of(db, name, 0)

    def expiry():  # type: ignore[no-untyped-def]
        return store.lease_of(db, trial).expires_at  # type: ignore[union-attr]

    age_lease(db, trial, 31)  # more than one heartbeat interval (30 s) left: no renewal written
    before = expiry()
    assert client.post(f"{API}/{name}/trials/0/report", json={"step": 1, "value": 0.5}).status_code == 200
    assert expiry() == before
    age_lease(db, trial, 29)  # less than that left: the report renews it for a whole lease
    before = expiry()
    assert client.post(f"{API}/{name}/trials/0/report", json={"step": 2, "value": 0.5}).status_code == 200
    assert (expiry() - before).total_seconds() > 25
    assert client.get(f"{API}/{name}/trials/0").json()["intermediate_values"] == {"1": 0.5, "2": 0.5}


def test_a_report_whose_fresh_lease_is_reaped_before_its_value_lands_is_lease_lost(
    client: TestClient, db, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from caviar.service.trials import leases
    from caviar.storage import utcnow

    name = create(client)
    ask(client, name)  # a fresh lease: the report writes no renewal
    write = db.optuna.set_trial_intermediate_value

    def reaped_first(trial_id, step, value):  # type: ignore[no-untyped-def]
        leases.reap(db, now=utcnow() + timedelta(hours=1))  # the reaper runs between read and write
        return write(trial_id, step, value)

    monkeypatch.setattr(db.optuna, "set_trial_intermediate_value", reaped_first)
    response = client.post(f"{API}/{name}/trials/0/report", json={"step": 1, "value": 0.5})
    assert response.status_code == 409 and error_code(response) == "lease_lost"
    assert client.get(f"{API}/{name}/trials/0").json()["intermediate_values"] == {}


def test_a_waiting_trial_is_not_running(client: TestClient) -> None:
    name = create(client)
    params = {"lr": 0.01, "beta1": 0.9, "dropout": 0.1}
    assert (
        client.post(f"{API}/{name}/trials/enqueue", json={"trials": [{"params": params}]}).status_code == 201
    )
    not_running = ("trial_not_running", f"trial 0 of {name!r} is not running")
    beat = client.post(f"{API}/{name}/trials/0/heartbeat")
    assert beat.status_code == 409
    assert (beat.json()["error"]["code"], beat.json()["error"]["message"]) == not_running
    tell = client.post(f"{API}/{name}/trials/0/tell", json={"state": "complete", "value": 1.0})
    assert tell.status_code == 409
    assert (tell.json()["error"]["code"], tell.json()["error"]["message"]) == not_running
    assert client.get(f"{API}/{name}/trials/0").json()["state"] == "waiting"


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("0/report", b'{"step": 1, "value": 1e999}', "value: must be a finite number (got inf)"),
        (  # one bad value in a batch: nothing of it is recorded
            "reports",
            b'{"reports": [{"number": 0, "step": 1, "value": 0.5}, {"number": 0, "step": 2, "value": -1e999}]}',
            "reports[1].value: must be a finite number (got -inf)",
        ),
    ],
)
def test_a_report_of_an_infinite_value_names_the_field_and_records_nothing(
    client: TestClient, path: str, body: bytes, message: str
) -> None:
    name = create(client)
    ask(client, name)
    response = client.post(
        f"{API}/{name}/trials/{path}", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and error_code(response) == "non_finite_value"
    assert response.json()["error"]["message"] == message
    assert client.get(f"{API}/{name}/trials/0").json()["intermediate_values"] == {}


def test_an_orphaned_retry_has_used_its_attempt(client: TestClient, db) -> None:  # type: ignore[no-untyped-def]
    from optuna.trial import TrialState

    from caviar.service.store import load_record
    from caviar.service.trials import reap
    from caviar.service.trials.lifecycle import _start_trial

    name = create(client, n_trials=5, max_retries=1, max_failed_trials=5)
    ask(client, name)
    client.post(f"{API}/{name}/trials/0/tell", json={"state": "fail", "reason": "boom"})  # retry: attempt 1
    record = load_record(db, name)
    waiting = db.optuna.get_all_trials(record.optuna_study_id, deepcopy=False, states=(TrialState.WAITING,))
    assert len(waiting) == 1
    _start_trial(db, record, waiting, "crashed-worker")  # the retry's ask died half-way
    assert reap(db) == 1
    assert client.get(f"{API}/{name}/trials/1").json()["fail_reason"] == "lost while being handed out"
    assert client.get(f"{API}/{name}").json()["trial_counts"]["waiting"] == 0  # no third attempt


def test_a_replay_that_reads_ready_after_the_parameters_reads_them_again(
    client: TestClient, db, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """One read of a trial is several statements: the parameters can come from before the last
    one was written and READY from after it (seen in CI under load: 29 of 30 parameters)."""
    import copy

    name = create(client)
    first = ask(client, name, request_id="r")
    get_trial = db.optuna.get_trial
    reads = []

    def split_read(trial_id: int):  # type: ignore[no-untyped-def]
        trial = copy.deepcopy(get_trial(trial_id))
        if not reads:  # the first read: READY seen, the last parameter not yet
            trial._params.pop("dropout")
            trial._distributions.pop("dropout")
        reads.append(trial_id)
        return trial

    monkeypatch.setattr(db.optuna, "get_trial", split_read)
    again = ask(client, name, request_id="r")
    assert again["params"] == first["params"] and len(reads) == 2


def reports(client: TestClient, name: str, items: list[dict]):  # type: ignore[no-untyped-def]
    return client.post(f"{API}/{name}/trials/reports", json={"worker_id": "w1", "reports": items})


def test_a_batch_of_reports_is_recorded_in_order_and_answers_each(client: TestClient) -> None:
    body = external_study("batch", n_trials=10)
    body["pruner"] = {"type": "median", "options": {"n_startup_trials": 1, "n_warmup_steps": 0}}
    client.post(API, json=body)
    for _ in range(4):
        ask(client, "batch")
    first = reports(
        client, "batch", [{"number": 0, "step": 0, "value": 0.9}, {"number": 0, "step": 1, "value": 0.9}]
    )
    assert first.json() == {
        "results": [
            {"number": 0, "step": 0, "should_prune": False, "code": None, "message": None},
            {"number": 0, "step": 1, "should_prune": False, "code": None, "message": None},
        ]
    }
    client.post(f"{API}/batch/trials/0/tell", json={"state": "complete", "value": 0.9})
    client.post(f"{API}/batch/trials/3/release", json={"reason": "handed back"})
    answer = reports(
        client,
        "batch",
        [
            {"number": 1, "step": 0, "value": 0.1},  # below the median of trial 0's curve: pruned
            {"number": 7, "step": 0, "value": 0.5},  # no such trial
            {"number": 3, "step": 0, "value": 0.5},  # handed back
            {"number": 0, "step": 2, "value": 0.5},  # finished
            {"number": 2, "step": 0, "value": 0.95},
        ],
    )
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [(r["number"], r["should_prune"], r["code"]) for r in results] == [
        (1, True, None),
        (7, True, "trial_not_found"),
        (3, True, "lease_lost"),
        (0, True, "trial_finished"),
        (2, False, None),
    ]
    assert results[2]["message"] == "trial 3 of 'batch' lost its lease (handed back); its retry runs instead"
    values = {n: client.get(f"{API}/batch/trials/{n}").json()["intermediate_values"] for n in range(4)}
    assert values == {0: {"0": 0.9, "1": 0.9}, 1: {"0": 0.1}, 2: {"0": 0.95}, 3: {}}


def test_a_malformed_batch_names_the_field(client: TestClient) -> None:
    name = create(client)
    for bad, field in [
        ({"reports": []}, "reports"),
        ({"reports": [{"number": 0, "step": -1, "value": 0.5}]}, "reports.0.step"),
        ({"reports": [{"number": 0, "step": 1, "value": 0.5, "extra": 1}]}, "reports.0.extra"),
        ({"reports": [{"number": 0, "step": 1, "value": 0.5}] * 257}, "reports"),
    ]:
        refused = client.post(f"{API}/{name}/trials/reports", json=bad)
        assert refused.status_code == 422, bad
        assert [d["field"] for d in refused.json()["error"]["details"]] == [field], refused.text
    assert reports(client, "missing", [{"number": 0, "step": 1, "value": 0.5}]).status_code == 404
