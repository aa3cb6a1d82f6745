"""``caviar.Client`` against a live server (uvicorn on loopback, the database under test)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest
import yaml
from pydantic import SecretStr
from sqlalchemy import select

import caviar
from caviar._client import is_pruned
from caviar.service.api import create_app
from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.processes import wait_until
from caviar.service.trials import reap
from caviar.storage import TrialLease, utcnow
from tests.service.helpers import external_study
from tests.service.test_dashboard import free_port, live_server


@pytest.fixture
def base(db: Database, db_url: str, tmp_path: Path) -> Iterator[str]:
    settings = Settings(
        database_url=db_url,
        heartbeat_interval_s=0.5,
        artifact_dir=str(tmp_path / "artifacts"),
        api_token=None,
        background_tasks=False,  # the tests reap with a controlled clock
    )
    with live_server(create_app(settings, db=db), free_port()) as url:
        yield url


@pytest.fixture
def client(base: str) -> Iterator[caviar.Client]:
    with caviar.Client(base, retry_s=5) as client:
        yield client


def test_import_caviar_exposes_the_public_api() -> None:
    assert {"Client", "Study", "Trial", "TrialPruned", "LeaseLost", "current_trial"} <= set(caviar.__all__)


def test_create_from_a_mapping_and_from_a_yaml_file(client: caviar.Client, tmp_path: Path) -> None:
    study = client.create_study(external_study("from-dict", n_trials=3))
    assert study.info()["state"] == "queued"
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(external_study("from-yaml", n_trials=3)))
    assert client.create_study(path).name == "from-yaml"
    with pytest.raises(caviar.CaviarApiError) as taken:
        client.create_study(path)
    assert taken.value.status == 409 and taken.value.code == "name_taken"


def test_the_with_block_tells_what_happened(client: caviar.Client) -> None:
    study = client.create_study(external_study("block", n_trials=10, max_retries=0))
    with study.ask() as trial:
        assert set(trial.params) == {"lr", "beta1", "dropout"} and 0.8 <= trial.params["beta1"] <= 0.999
        trial.report(0.5, 0)
        trial.tell(0.9)
    with study.ask() as pruned:
        raise caviar.TrialPruned()
    with pytest.raises(ZeroDivisionError), study.ask() as failed:
        1 / 0  # noqa: B018
    with pytest.raises(RuntimeError, match=r"without trial\.tell"), study.ask() as forgotten:
        pass
    states = {t["number"]: (t["state"], t["fail_reason"]) for t in study.trials()}
    assert states[trial.number] == ("complete", None)
    assert states[pruned.number][0] == "pruned"
    assert states[failed.number] == ("fail", "ZeroDivisionError: division by zero")
    assert states[forgotten.number][0] == "fail"
    assert study.best()["number"] == trial.number


def test_should_prune_answers_the_pruners_decision_for_the_last_report(client: caviar.Client) -> None:
    body = external_study("prune", n_trials=2)
    body["pruner"] = {"type": "threshold", "options": {"lower": 0.5}}
    study = client.create_study(body)
    with study.ask() as trial:
        assert not trial.should_prune()  # nothing reported yet
        trial.report(0.9, 0)
        assert not trial.should_prune()
        trial.report(value=0.1, step=1)  # Optuna's order, by keyword too; nothing raised here
        assert trial.should_prune()
        raise caviar.TrialPruned()
    [told] = study.trials()
    assert told["state"] == "pruned" and told["intermediate_values"] == {"0": 0.9, "1": 0.1}


def test_the_block_heartbeats_in_the_background(client: caviar.Client, db: Database) -> None:
    study = client.create_study(external_study("beats", n_trials=2))
    with study.ask() as trial:
        expiries: set[datetime] = set()

        def kept_past_a_lapse() -> bool:
            """Two renewals seen, and the clock is past an expiry the lease had (1 s leases)."""
            with db.session() as session:
                expiries.add(session.scalar(select(TrialLease.expires_at).filter_by(number=trial.number)))
            return len(expiries) >= 3 and utcnow() > min(expiries)

        wait_until(kept_past_a_lapse, 30, "the background heartbeats did not renew the lease")
        assert reap(db) == 0
        trial.tell(1.0)
    assert study.trials()[0]["state"] == "complete"


def test_report_group_reports_a_step_of_several_trials_in_one_call(
    client: caviar.Client, db: Database
) -> None:
    body = external_study("group", n_trials=5)
    body["pruner"] = {"type": "threshold", "options": {"lower": 0.5}}
    study = client.create_study(body)
    trials = [study.ask(heartbeat=False) for _ in range(3)]
    assert caviar.report_group(trials, [0.9, 0.1, 0.8], 0) == [False, True, False]
    assert [t.should_prune() for t in trials] == [False, True, False]
    trials[1].prune()  # told: not sent again
    assert reap(db, now=utcnow() + timedelta(seconds=60)) == 2  # 0 and 2 lose their leases unheard of
    assert caviar.report_group(trials, [0.9, 0.9, 0.9], 1) == [True, True, True]
    with pytest.raises(caviar.LeaseLost):
        trials[2].tell(0.9)  # the answer is remembered: nothing this trial says counts any more
    told = {t["number"]: t["intermediate_values"] for t in study.trials()}
    assert told[0] == {"0": 0.9} and told[1] == {"0": 0.1}
    with pytest.raises(ValueError, match="2 values for 3 trials"):
        caviar.report_group(trials, [0.1, 0.2], 2)
    with pytest.raises(TypeError, match="step must be an int"):
        caviar.report_group(trials[:1], [0.5], 1.0)  # type: ignore[arg-type]
    other = client.create_study(external_study("elsewhere", n_trials=5)).ask(heartbeat=False)
    with pytest.raises(ValueError, match="of one study"):
        caviar.report_group([trials[0], other], [0.5, 0.5], 2)


def test_a_lost_lease_raises_lease_lost(client: caviar.Client, db: Database) -> None:
    study = client.create_study(external_study("lost", n_trials=3))
    trial = study.ask(heartbeat=False)
    assert reap(db, now=utcnow() + timedelta(seconds=60)) == 1
    with pytest.raises(caviar.LeaseLost):
        trial.report(0.5, 0)
    with pytest.raises(caviar.LeaseLost):
        trial.tell(0.5)  # remembered: nothing this trial says counts any more


def test_optimize_stops_at_the_global_budget_shared_by_several_clients(base: str) -> None:
    with caviar.Client(base) as first, caviar.Client(base) as second:
        study = first.create_study(external_study("shared", n_trials=13))

        def objective(trial: caviar.Trial) -> float:
            time.sleep(0.01)
            return -abs(trial.params["dropout"] - 0.3)

        counts: list[int] = []
        threads = [
            threading.Thread(
                target=lambda c=c: counts.append(c.study("shared").optimize(objective, n_jobs=3))
            )
            for c in (first, second)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sum(counts) == 13, counts
        info = study.info()
        assert info["state"] == "completed" and info["trial_counts"]["complete"] == 13


def test_optimize_caps_this_call_and_catches_listed_errors(client: caviar.Client) -> None:
    study = client.create_study(external_study("capped", n_trials=10, max_retries=0))
    calls = {"n": 0}

    def objective(trial: caviar.Trial) -> float:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("bad luck")
        return 1.0

    assert study.optimize(objective, n_trials=4, catch=(ValueError,)) == 4
    states = sorted(t["state"] for t in study.trials())
    assert states == ["complete", "complete", "complete", "fail"]


def test_ask_waits_for_a_free_place_under_max_parallel(client: caviar.Client) -> None:
    study = client.create_study(external_study("par", n_trials=4, max_parallel=1))
    first = study.ask(heartbeat=False)
    threading.Timer(0.8, lambda: first.tell(1.0)).start()
    started = time.monotonic()
    second = study.ask(heartbeat=False)  # 429 + Retry-After until the first is told
    assert time.monotonic() - started >= 0.7 and second.number != first.number
    with pytest.raises(caviar.CaviarApiError) as full:
        study.ask(heartbeat=False, wait=False)
    assert full.value.status == 429 and full.value.code == "max_parallel_reached"


class _Flaky(httpx.BaseTransport):
    """A real HTTP transport that fails on purpose: 503 first, or a lost answer after the server acted."""

    def __init__(self, mode: str) -> None:
        self.inner = httpx.HTTPTransport()
        self.mode = mode
        self.calls = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.mode == "503" and self.calls == 1:
            return httpx.Response(
                503,
                headers={"Retry-After": "0"},
                json={"error": {"code": "database_unavailable", "message": "down"}},
            )
        response = self.inner.handle_request(request)
        if self.mode == "lost" and request.url.path.endswith("/ask") and self.calls == 1:
            response.read()
            raise httpx.ReadError("connection reset after the server answered")
        return response


@pytest.mark.parametrize("mode", ["503", "lost"])
def test_retries_through_outages_without_claiming_two_trials(base: str, mode: str) -> None:
    flaky = _Flaky(mode)
    with caviar.Client(base) as setup, caviar.Client(base, transport=flaky, retry_s=10) as client:
        study = setup.create_study(external_study(f"flaky-{mode}", n_trials=5))
        trial = client.study(study.name).ask(heartbeat=False)
        trial.tell(0.5)
        trials = study.trials()
    assert flaky.calls >= 3  # the failed attempt, its retry, the tell
    assert [t["number"] for t in trials] == [trial.number], trials  # one trial, not two


def test_unreachable_service_gives_up_after_retry_s() -> None:
    with caviar.Client(f"http://127.0.0.1:{free_port()}", retry_s=1) as client:
        started = time.monotonic()
        with pytest.raises(caviar.CaviarApiError) as unreachable:
            client.study("x").info()
    # it gives up within the window (a lower bound on jittered backoff is a timing bet: CI lost it)
    assert unreachable.value.code == "unreachable" and time.monotonic() - started < 5


def test_upload_and_download_a_file(client: caviar.Client, tmp_path: Path) -> None:
    study = client.create_study(external_study("files", n_trials=2))
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00\x01" * 1000)
    with study.ask() as trial:
        stored: dict[str, Any] = trial.upload(path)
        trial.tell(1.0)
    assert stored["filename"] == "weights.bin"
    assert [a["filename"] for a in study.artifacts(trial.number)] == ["weights.bin"]
    assert study.download(trial.number, "weights.bin") == path.read_bytes()


def test_current_trial_outside_a_worker_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAVIAR_TRIAL", raising=False)
    with pytest.raises(
        RuntimeError,
        match=r"^caviar\.current_trial\(\): not running under a caviar worker \(CAVIAR_TRIAL is unset\)$",
    ):
        caviar.current_trial()


def test_a_ctrl_c_in_the_block_hands_the_trial_back(client: caviar.Client) -> None:
    """A KeyboardInterrupt is not the trial's fault: it is retried without using a retry, and the
    study does not fail (mutant: the block fails the trial instead)."""
    study = client.create_study(external_study("ctrl-c", n_trials=5, max_retries=0, max_failed_trials=0))
    with pytest.raises(KeyboardInterrupt), study.ask() as interrupted:
        raise KeyboardInterrupt
    [handed_back] = study.trials("fail")
    assert (handed_back["state"], handed_back["fail_reason"]) == ("fail", "interrupted (KeyboardInterrupt)")
    info = study.info()
    assert info["state"] == "running" and info["trial_counts"]["waiting"] == 1
    with study.ask() as retry:
        retry.tell(1.0)
    assert retry.params == interrupted.params
    assert study.trials("complete")[0]["retry_of"] == interrupted.number


def test_trials_reads_every_page_once(client: caviar.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutant: each page asks for the first page again (the first trials repeated, the rest lost)."""
    study = client.create_study(external_study("pages", n_trials=5))
    study.enqueue(
        [{"params": {"lr": 0.01, "beta1": 0.9, "dropout": 0.1}, "value": float(i)} for i in range(5)]
    )
    monkeypatch.setattr(caviar._client, "TRIALS_PAGE", 2)
    assert [t["number"] for t in study.trials()] == [0, 1, 2, 3, 4]
    assert [t["number"] for t in study.trials("complete")] == [0, 1, 2, 3, 4]


def test_current_trial_is_the_workers_assignment_one_object_per_trial(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under a worker, ``current_trial()`` builds the trial from ``CAVIAR_TRIAL`` (no heartbeat of
    its own: the worker beats), returns the same object while the trial is the same, and lets a
    ``TrialPruned`` end the program as pruned instead of failed."""
    import caviar._client as module

    monkeypatch.setattr(module, "_current", None)
    monkeypatch.setattr(module, "_shared", None)
    monkeypatch.setattr(module, "_hooked", False)
    seen: list[Any] = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: seen.append(args[1]))
    monkeypatch.setenv("CAVIAR_URL", "http://127.0.0.1:9")
    assignment = {"study": "s", "number": 4, "params": {"lr": 0.1}, "worker_id": "w-1", "result_file": "/r"}
    monkeypatch.setenv("CAVIAR_TRIAL", json.dumps(assignment))
    trial = caviar.current_trial()
    assert (trial.study, trial.number, trial.params, trial.worker_id) == ("s", 4, {"lr": 0.1}, "w-1")
    assert trial._result_file == "/r" and trial._heartbeat is False
    assert caviar.current_trial() is trial
    assert trial.client is module._shared_client()
    # another trial (number or study): another object
    monkeypatch.setenv("CAVIAR_TRIAL", json.dumps({**assignment, "number": 5}))
    fifth = caviar.current_trial()
    assert fifth is not trial and fifth.number == 5
    monkeypatch.setenv("CAVIAR_TRIAL", json.dumps({**assignment, "number": 5, "study": "t"}))
    other = caviar.current_trial()
    assert other is not fifth and other.study == "t"
    # the prune hook: TrialPruned prunes the current trial; anything else goes to the old hook
    pruned: list[int] = []
    monkeypatch.setattr(other, "prune", lambda **_: pruned.append(other.number))
    sys.excepthook(caviar.TrialPruned, caviar.TrialPruned("step 3"), None)
    assert pruned == [5] and seen == []
    assert "trial 5 pruned (TrialPruned: step 3)" in capsys.readouterr().err
    error = ValueError("x")
    sys.excepthook(ValueError, error, None)
    assert seen == [error]


def test_a_definition_file_is_json_by_its_suffix_and_must_be_one_mapping(tmp_path: Path) -> None:
    from caviar._client import _load_definition

    definition = external_study("from-json")
    tabbed = tmp_path / "study.json"
    tabbed.write_text(json.dumps(definition, indent="\t"))  # tabs: valid JSON, not valid YAML
    assert _load_definition(tabbed) == definition
    listed = tmp_path / "two.yaml"
    listed.write_text("- name: a\n- name: b\n")
    with pytest.raises(ValueError, match=r"two\.yaml: expected one study definition \(a mapping\)$"):
        _load_definition(listed)


# ---- found by mutation testing (the client run of 2026-12-07): each kills named survivors ----


def test_a_worker_token_proves_its_claim_with_the_trials_credential(
    db: Database, db_url: str, tmp_path: Path
) -> None:
    """With tokens on, a worker-scope token acts on a trial only with the credential its ask
    answered (``X-Caviar-Lease``): heartbeat, report, upload, tell and hand-back all pass."""
    admin = "client-admin-token-0123456789abcdef"
    settings = Settings(
        database_url=db_url,
        heartbeat_interval_s=0.5,
        artifact_dir=str(tmp_path / "artifacts"),
        api_token=SecretStr(admin),
        background_tasks=False,
    )
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00\x01" * 10)
    with (
        live_server(create_app(settings, db=db), free_port()) as url,
        caviar.Client(url, admin, retry_s=5) as owner,
    ):
        owner.create_study(external_study("secured", n_trials=5))
        worker_token = owner.create_token("worker")["token"]
        with caviar.Client(url, worker_token, retry_s=5) as client:
            study = client.study("secured")
            with study.ask() as trial:
                assert trial.credential
                trial.heartbeat()
                trial.report(0.5, 0)
                assert trial.upload(path)["filename"] == "weights.bin"
                trial.tell(0.9)
            study.ask(heartbeat=False).release("handed back on purpose")
            # a group of trials reports in one call: with the worker token, and with each trial's
            # own credential as its token (a fused group's program), each report proved by its trial's
            group = [study.ask(heartbeat=False) for _ in range(2)]
            assert caviar.report_group(group, [0.5, 0.6], 0) == [False, False]
            own = [
                caviar.Trial(
                    caviar.Client(url, t.credential),
                    {"study": t.study, "number": t.number, "params": t.params, "credential": t.credential},
                    worker_id=None,
                )
                for t in group
            ]
            assert caviar.report_group(own, [0.7, 0.8], 1) == [False, False]
        values = {t["number"]: t["intermediate_values"] for t in owner.study("secured").trials()}
        states = sorted(t["state"] for t in owner.study("secured").trials())
    assert states == ["complete", "fail", "running", "running"]  # told; handed back (its retry runs)
    assert [values[t.number] for t in group] == [{"0": 0.5, "1": 0.7}, {"0": 0.6, "1": 0.8}]


def test_the_client_passes_its_token_timeout_and_patience_to_every_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CAVIAR_API_TOKEN", raising=False)
    seen: list[httpx.Request] = []

    def starting(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:  # nothing listens yet: the service is still starting
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"name": "s", "state": "queued"})

    transport = httpx.MockTransport(starting)
    with caviar.Client(
        "http://caviar.test", "tok-1", timeout_s=7.5, retry_s=5, transport=transport
    ) as client:
        assert client.study("s").info()["state"] == "queued"  # waited through the refusal
    assert len(seen) == 2 and seen[1].headers["Authorization"] == "Bearer tok-1"
    assert seen[1].extensions["timeout"] == {"connect": 7.5, "read": 7.5, "write": 7.5, "pool": 7.5}
    seen.clear()
    with (
        caviar.Client(
            "http://caviar.test", "tok-1", retry_s=5, wait_for_service=False, transport=transport
        ) as impatient,
        pytest.raises(caviar.CaviarApiError) as refused,
    ):
        impatient.study("s").info()
    assert refused.value.code == "unreachable" and len(seen) == 1  # said at once, as the CLI needs


def test_an_ask_carries_its_worker_id_and_its_fixed_values(client: caviar.Client) -> None:
    study = client.create_study(external_study("labelled", n_trials=5))
    named = study.ask(worker_id="gpu-7", fixed={"dropout": 0.25}, heartbeat=False)
    anonymous = study.ask(heartbeat=False)
    assert named.params["dropout"] == 0.25
    workers = {t["number"]: t["worker_id"] for t in study.trials()}
    assert workers[named.number] == "gpu-7"
    assert workers[anonymous.number] == caviar._client._client_id()


class _CountingAsks(httpx.BaseTransport):
    def __init__(self) -> None:
        self.inner, self.asks = httpx.HTTPTransport(), 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.asks += request.url.path.endswith("/ask")
        return self.inner.handle_request(request)


def test_a_waiting_ask_waits_as_the_service_asks_and_an_impatient_one_does_not(base: str) -> None:
    """A full study answers 429 with Retry-After (1 s at least): a waiting ask waits that long
    between tries, also when its client's retry window is shorter (it asked again at once, in a
    tight loop, before); ``wait=False`` answers at once."""
    patient, hasty = _CountingAsks(), _CountingAsks()
    with (
        caviar.Client(base, retry_s=30, transport=patient) as client,
        caviar.Client(base, retry_s=0.3, transport=hasty) as short,
    ):
        study = client.create_study(external_study("polite", n_trials=5, max_parallel=1))
        first = study.ask(heartbeat=False)
        threading.Timer(1.5, lambda: first.tell(1.0)).start()
        second = study.ask(heartbeat=False)
        assert patient.asks <= 5, patient.asks
        started = time.monotonic()
        with pytest.raises(caviar.CaviarApiError) as full:
            study.ask(heartbeat=False, wait=False)
        assert full.value.code == "max_parallel_reached" and time.monotonic() - started < 10
        threading.Timer(1.5, lambda: second.tell(1.0)).start()
        third = short.study("polite").ask(heartbeat=False)  # several 0.3 s retry windows end meanwhile
        assert third.number not in (first.number, second.number)
        assert hasty.asks <= 5, hasty.asks


def test_a_trial_asked_without_heartbeat_beats_not_in_its_block(client: caviar.Client) -> None:
    study = client.create_study(external_study("quiet", n_trials=2))
    with study.ask(heartbeat=False) as trial:
        assert trial._thread is None
        trial.tell(1.0)
    assert trial.finished


def test_optimize_runs_in_the_callers_thread_by_default_and_n_jobs_at_once(client: caviar.Client) -> None:
    """Objectives need not be thread-safe unless ``n_jobs`` says so."""
    study = client.create_study(external_study("threads", n_trials=6))
    threads: set[str] = set()

    def alone(trial: caviar.Trial) -> float:
        threads.add(threading.current_thread().name)
        return 1.0

    assert study.optimize(alone, n_trials=2) == 2 and study.optimize(alone, n_trials=1, n_jobs=1) == 1
    assert threads == {threading.current_thread().name}
    both = threading.Barrier(2, timeout=10)

    def together(trial: caviar.Trial) -> float:
        both.wait()  # passes only when two objectives run at once
        return 1.0

    assert study.optimize(together, n_trials=2, n_jobs=2) == 2


def test_an_error_after_the_tell_or_after_a_lost_lease_leaves_the_block(
    client: caviar.Client, db: Database
) -> None:
    study = client.create_study(external_study("after", n_trials=5))
    with pytest.raises(ValueError, match="after the tell"), study.ask() as told:
        told.tell(1.0)
        raise ValueError("after the tell")
    with pytest.raises(ValueError, match="the objective's own error"), study.ask() as lost:
        assert reap(db, now=utcnow() + timedelta(seconds=60)) == 1
        thread = lost._thread
        assert thread is not None
        wait_until(lambda: not thread.is_alive(), 30, "the heartbeat did not stop at the lost lease")
        raise ValueError("the objective's own error")  # not replaced by LeaseLost from __exit__


def test_a_retry_knows_the_trial_it_retries(client: caviar.Client) -> None:
    study = client.create_study(external_study("retried", n_trials=3, max_retries=1))
    first = study.ask(heartbeat=False)
    first.fail("once")
    retry = study.ask(heartbeat=False)
    assert retry.retry_of == first.number and retry.params == first.params
    assert first.retry_of is None


def test_the_block_keeps_its_lease_while_the_study_stops(client: caviar.Client, db: Database) -> None:
    """A stop leaves a running trial its lease until its tell: the heartbeats go on."""
    study = client.create_study(external_study("stopping", n_trials=5))
    with study.ask() as trial:
        study.stop("enough")
        renewed: set[datetime] = set()

        def still_renewed() -> bool:
            with db.session() as session:
                renewed.add(session.scalar(select(TrialLease.expires_at).filter_by(number=trial.number)))
            return len(renewed) >= 3 and utcnow() > min(renewed)  # 1 s leases: past a lapse

        wait_until(still_renewed, 30, "the heartbeats stopped with the study")
        assert reap(db) == 0
        trial.tell(0.5)
    assert [t["state"] for t in study.trials()] == ["complete"]


def test_user_attributes_given_to_tell_fail_and_prune_are_stored(client: caviar.Client) -> None:
    study = client.create_study(external_study("attrs", n_trials=6, max_retries=0, max_failed_trials=5))
    told, failed, pruned = (study.ask(heartbeat=False) for _ in range(3))
    told.tell(0.5, user_attrs={"epochs": 3})
    failed.fail("boom", user_attrs={"epochs": 1})
    pruned.prune(user_attrs={"epochs": 2})
    attrs = {t["number"]: t["user_attrs"].get("epochs") for t in study.trials()}
    assert (attrs[told.number], attrs[failed.number], attrs[pruned.number]) == (3, 1, 2)


def test_long_reasons_are_cut_to_the_services_limit_and_a_failure_needs_none(client: caviar.Client) -> None:
    study = client.create_study(external_study("reasons", n_trials=10, max_retries=0, max_failed_trials=5))
    handed, long_fail, silent = (study.ask(heartbeat=False) for _ in range(3))
    handed.release("y" * 2500)  # the beginning of a hand-back reason is kept
    long_fail.fail("a" + "x" * 2500)  # the end of a failure's (a traceback's last lines)
    silent.fail()
    reasons = {t["number"]: t["fail_reason"] for t in study.trials("fail")}
    assert reasons[handed.number] == "y" * 2000
    assert reasons[long_fail.number] == "x" * 2000
    assert reasons[silent.number] is None


def test_a_release_in_the_block_ends_it_quietly(client: caviar.Client) -> None:
    study = client.create_study(external_study("handback", n_trials=3))
    with study.ask() as trial:
        trial.release("not now")
    assert trial.finished
    assert [t["state"] for t in study.trials()] == ["fail", "waiting"]  # handed back, and its retry


def test_a_pruned_report_outside_a_worker_leaves_no_file(
    client: caviar.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``.pruned`` mark is for a worker's program only, not for a client loop's directory."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    body = external_study("no-mark", n_trials=2)
    body["pruner"] = {"type": "threshold", "options": {"lower": 0.5}}
    study = client.create_study(body)
    with study.ask() as trial:
        trial.report(0.9, 0)
        trial.report(0.1, 1)
        assert trial.should_prune()
        trial.prune()
    assert list(work.iterdir()) == []


def test_tell_takes_the_values_of_several_objectives_as_one_sequence(client: caviar.Client) -> None:
    body = external_study("two-goals", n_trials=2)
    body.pop("direction")
    body["directions"] = ["maximize", "minimize"]
    body["metric"] = ["acc", "latency"]
    study = client.create_study(body)
    study.ask(heartbeat=False).tell([0.9, 3.0])
    assert study.trials()[0]["values"] == [0.9, 3.0]


def test_only_a_trial_pruned_exception_counts_as_pruned() -> None:
    class TrialPruned(Exception):  # a user's own class of that name
        pass

    assert is_pruned(caviar.TrialPruned()) and is_pruned(optuna.TrialPruned("step 3"))
    assert not is_pruned(optuna.exceptions.OptunaError("storage")) and not is_pruned(TrialPruned())
    assert not is_pruned(ValueError("x")) and not is_pruned(None)


def test_a_workers_trial_has_a_client_and_other_errors_reach_the_old_hook_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import caviar._client as module

    monkeypatch.setattr(module, "_current", None)
    monkeypatch.setattr(module, "_shared", None)
    monkeypatch.setattr(module, "_hooked", False)
    seen: list[tuple[Any, ...]] = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: seen.append(args))
    monkeypatch.setenv("CAVIAR_URL", "http://127.0.0.1:9")
    trial_env = {"study": "s", "number": 1, "params": {}, "result_file": "/r"}
    monkeypatch.setenv("CAVIAR_TRIAL", json.dumps(trial_env))
    trial = caviar.current_trial()
    assert isinstance(trial.client, caviar.Client) and trial.client.url == "http://127.0.0.1:9"
    try:
        raise ValueError("x")
    except ValueError as exc:
        error = exc
    sys.excepthook(ValueError, error, error.__traceback__)
    assert seen == [(ValueError, error, error.__traceback__)]  # type and traceback: the trial log's
