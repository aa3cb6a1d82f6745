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
import pytest
import yaml
from sqlalchemy import select

import caviar
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
