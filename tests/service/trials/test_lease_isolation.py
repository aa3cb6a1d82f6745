"""Leases on their own path, ask admission and bounded critical sections (issue 22).

Each test forces its interleaving (events, a sampler that blocks on an Event, a lock wrapper) so
it is deterministic, and each fails on the code before these changes: a trial being sampled was
reaped, a heartbeat waited for connections held by an import or by asks, a burst of asks was never
refused, an import held the study lock around all its trials.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio.to_thread
import httpx
import pytest
from fastapi.testclient import TestClient
from optuna.trial import TrialState
from sqlalchemy import Engine

import caviar
from caviar.service import trials as service
from caviar.service.api import create_app
from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.processes import wait_until
from caviar.service.store import (
    RELEASED,
    LeasePolicy,
    SamplingHolds,
    all_trials,
    count_states,
    create_study,
    fail_count,
    lease_of,
    load_record,
    parse_definition,
    trial_id,
)
from caviar.service.trials import enqueue as enqueue_module
from caviar.service.trials import leases, lifecycle, reap
from caviar.service.trials.enqueue import enqueue
from caviar.service.trials.schemas import EnqueueItem
from caviar.storage import utcnow
from tests.service.helpers import external_study
from tests.service.test_dashboard import free_port, live_server

API = "/api/v1/studies"
WAIT_S = 30.0
"""How long a step that should be immediate may take before the test gives up (a loaded machine)."""


@contextlib.contextmanager
def blocked_sampler(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Make every ask's sampling wait: yields (sampling started, let it go); lets it go at the end."""
    sampling, go = threading.Event(), threading.Event()
    real = lifecycle._sample

    def slow(trial: Any, definition: Any) -> None:
        sampling.set()
        assert go.wait(WAIT_S * 2), "the test never let the sampler go"
        real(trial, definition)

    monkeypatch.setattr(lifecycle, "_sample", slow)
    try:
        yield sampling, go
    finally:
        go.set()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` on a thread; its result or exception lands in the returned dict."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # surfaced by the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def heartbeats_in_time(
    client: TestClient, refs: list[dict[str, Any]], trial_path: str, waited_for: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send worker w1's heartbeat for ``refs`` and one trial heartbeat (``trial_path``) at once;
    both must be answered within a third of :data:`WAIT_S`. Returns their outcomes."""
    worker, worker_out = in_thread(lambda: client.post("/api/v1/workers/w1/heartbeat", json={"trials": refs}))
    trial, trial_out = in_thread(lambda: client.post(f"{API}/{trial_path}/heartbeat"))
    worker.join(WAIT_S / 3)
    trial.join(WAIT_S / 3)
    assert not worker.is_alive(), f"the worker's heartbeat waited for {waited_for}"
    assert not trial.is_alive(), f"the trial's heartbeat waited for {waited_for}"
    return worker_out, trial_out


# ---- (a) a trial being sampled is never reaped ----------------------------------------------


def test_a_trial_being_sampled_is_never_reaped_even_past_its_lease(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = LeasePolicy(heartbeat_interval_s=0.05)  # a lease of 0.1 s: the sampling outlasts it
    create_study(db, parse_definition(external_study("slow")))
    record = load_record(db, "slow")
    with blocked_sampler(monkeypatch) as (sampling, go):
        thread, out = in_thread(lambda: lifecycle.ask(db, "slow", worker_id="w", policy=policy))
        assert sampling.wait(WAIT_S)
        tid = trial_id(db, record, 0)
        claimed = lease_of(db, tid)
        assert claimed is not None
        first_expiry = claimed.expires_at
        wait_until(lambda: utcnow() > first_expiry, WAIT_S, "the claim's lease never lapsed")
        assert reap(db) == 0  # the lease the ask started has lapsed, but the trial is being sampled
        assert db.optuna.get_trial(tid).state == TrialState.RUNNING
        go.set()
        thread.join(WAIT_S)
    assert "error" not in out, out.get("error")
    assigned = out["result"]
    assert assigned.number == 0 and set(assigned.params) == {"lr", "beta1", "dropout"}
    assert assigned.lease_expires_at > first_expiry  # the lease proper starts with the parameters
    told = lifecycle.tell(db, "slow", 0, "complete", values=[1.0])
    assert told.state == "complete"


def test_a_held_lease_is_renewed_and_the_renewing_thread_ends_once_nothing_is_held(db: Database) -> None:
    """Another server process's reaper does not know this process's holds: the renewals keep the
    lease; and the thread does not outlive the holds (it kept its Database alive for good)."""
    policy = LeasePolicy(heartbeat_interval_s=0.05)
    create_study(db, parse_definition(external_study("held")))
    lifecycle.ask(db, "held", worker_id="w", policy=policy)
    tid = trial_id(db, load_record(db, "held"), 0)
    holds = SamplingHolds(db)

    def renewed_past(before: Any) -> bool:
        lease = lease_of(db, tid)
        return lease is not None and lease.expires_at > before

    for _ in range(2):  # a hold after the thread ended starts another
        with holds.hold(tid, policy):
            before = lease_of(db, tid).expires_at  # type: ignore[union-attr]
            wait_until(lambda b=before: renewed_past(b), WAIT_S, "the held lease was not renewed")
            thread = holds._thread
        assert thread is not None
        thread.join(WAIT_S)
        assert not thread.is_alive(), "the renewing thread outlived its holds"


# ---- (b) a heartbeat never waits on a study lock, an import or asks --------------------------


def _optuna_engine(db: Database) -> Engine:
    storage = db.optuna
    engine: Engine = getattr(storage, "_backend", storage).engine
    return engine


@contextlib.contextmanager
def every_connection_taken(db: Database) -> Iterator[None]:
    """Hold the study lock's and every connection of caviar's and Optuna's pools (as an import and
    a burst of asks do), until the block ends."""
    held = []
    try:
        for engine in (db.engine, _optuna_engine(db)):
            pool: Any = engine.pool
            capacity = pool.size() + max(0, pool._max_overflow) - pool.checkedout()
            held += [engine.connect() for _ in range(capacity)]
        yield
    finally:
        for connection in held:
            connection.close()


def test_heartbeats_complete_while_the_study_lock_and_every_pool_connection_are_held(
    db: Database, settings: Settings
) -> None:
    with TestClient(create_app(settings, db=db)) as client:
        assert client.post(API, json=external_study("a")).status_code == 201
        assert client.post(API, json=external_study("b")).status_code == 201
        for name in ("a", "b"):
            assert client.post(f"{API}/{name}/trials/ask", json={"worker_id": "w1"}).status_code == 200
        assert client.post(
            "/api/v1/workers", json={"id": "w1", "host": "h", "pid": 1, "device": "cpu"}
        ).is_success
        record = load_record(db, "b")
        before = lease_of(db, trial_id(db, record, 0))
        assert before is not None
        locked, release = threading.Event(), threading.Event()

        def importer() -> None:  # study a's import holds its lock and every connection
            with db.study_lock(load_record(db, "a").id), every_connection_taken(db):
                locked.set()
                release.wait(WAIT_S * 3)

        holder, _ = in_thread(importer)
        try:
            assert locked.wait(WAIT_S)
            refs = [{"study": "a", "number": 0}, {"study": "b", "number": 0}]
            worker_out, trial_out = heartbeats_in_time(client, refs, "b/trials/0", "the held lock or pools")
        finally:
            release.set()
            holder.join(WAIT_S)
        assert worker_out["result"].status_code == 200, worker_out
        assert worker_out["result"].json() == {"lost": []}
        assert trial_out["result"].status_code == 204, trial_out
        after = lease_of(db, trial_id(db, record, 0))
        assert after is not None and after.expires_at > before.expires_at


def test_heartbeats_are_answered_while_reports_fill_every_request_thread(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TestClient(create_app(settings, db=db)) as client:

        def shrink_request_threads() -> None:  # two request threads instead of 40: two reports fill them
            anyio.to_thread.current_default_thread_limiter().total_tokens = 2

        client.portal.call(shrink_request_threads)  # type: ignore[union-attr]
        assert client.post(API, json=external_study("a")).status_code == 201
        for _ in range(3):
            assert client.post(f"{API}/a/trials/ask", json={"worker_id": "w1"}).status_code == 200
        assert client.post(
            "/api/v1/workers", json={"id": "w1", "host": "h", "pid": 1, "device": "cpu"}
        ).is_success
        entered, release = threading.Semaphore(0), threading.Event()
        report = service.report

        def held_report(*args: Any, **kwargs: Any) -> bool:
            entered.release()
            release.wait(WAIT_S * 3)
            return report(*args, **kwargs)

        monkeypatch.setattr(service, "report", held_report)
        reporters = [
            in_thread(lambda n=n: client.post(f"{API}/a/trials/{n}/report", json={"step": 0, "value": 0.5}))
            for n in (0, 1)
        ]
        try:
            assert entered.acquire(timeout=WAIT_S) and entered.acquire(timeout=WAIT_S)
            refs = [{"study": "a", "number": n} for n in range(3)]
            worker_out, trial_out = heartbeats_in_time(client, refs, "a/trials/2", "a request thread")
        finally:
            release.set()
            for thread, _ in reporters:
                thread.join(WAIT_S)
        assert worker_out["result"].status_code == 200 and worker_out["result"].json() == {"lost": []}
        assert trial_out["result"].status_code == 204, trial_out
        assert [out["result"].status_code for _, out in reporters] == [200, 200]


# ---- (c) asks beyond the process's bound: in line, then 429 + Retry-After, and the client retries -


def test_asks_beyond_the_bound_get_429_with_retry_after_and_the_client_retries(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.model_copy(
        update={"background_tasks": False, "max_concurrent_asks": 1, "ask_queue_s": 0}  # no line
    )
    create_study(db, parse_definition(external_study("burst")))
    with (
        live_server(create_app(settings, db=db), free_port()) as base,
        blocked_sampler(monkeypatch) as (
            sampling,
            go,
        ),
    ):
        ask_url = f"{base}{API}/burst/trials/ask"
        first, first_out = in_thread(
            lambda: httpx.post(ask_url, json={"worker_id": "w1"}, timeout=WAIT_S * 3)
        )
        assert sampling.wait(WAIT_S)
        second, second_out = in_thread(
            lambda: httpx.post(ask_url, json={"worker_id": "w2"}, timeout=WAIT_S * 3)
        )
        second.join(WAIT_S / 3)
        assert not second.is_alive(), "the ask beyond the bound was queued instead of refused"
        refused = second_out["result"]
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 3
        error = refused.json()["error"]
        assert error["code"] == "too_many_asks" and "max_concurrent_asks" in error["message"]

        waits: list[float] = []

        def wait_for_the_slot(
            pause: float, _stop: object = None
        ) -> None:  # instead of sleeping: let the first ask finish
            waits.append(pause)
            go.set()
            first.join(WAIT_S)

        monkeypatch.setattr("caviar._http._sleep", wait_for_the_slot)
        with caviar.Client(base, retry_s=60) as client:
            trial = client.study("burst").ask(worker_id="w3", heartbeat=False, wait=False)
        assert trial.number == 1
        assert waits and waits[0] >= 1.0  # it waited Retry-After (with jitter) before retrying
        assert first_out["result"].status_code == 200 and first_out["result"].json()["number"] == 0
    counts = count_states(db, load_record(db, "burst"))
    assert counts[TrialState.RUNNING] == 2 and counts[TrialState.FAIL] == 0


def test_an_ask_beyond_the_bound_waits_in_line_for_a_turn_and_one_past_the_line_is_refused(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.model_copy(
        update={
            "background_tasks": False,
            "max_concurrent_asks": 1,
            "ask_queue_s": WAIT_S,
            "max_queued_asks": 1,
        }
    )
    create_study(db, parse_definition(external_study("line")))
    app = create_app(settings, db=db)
    with live_server(app, free_port()) as base, blocked_sampler(monkeypatch) as (sampling, go):
        ask_url = f"{base}{API}/line/trials/ask"

        def ask(worker: str) -> httpx.Response:
            return httpx.post(ask_url, json={"worker_id": worker}, timeout=WAIT_S * 3)

        first, first_out = in_thread(lambda: ask("w1"))
        assert sampling.wait(WAIT_S)
        second, second_out = in_thread(lambda: ask("w2"))
        wait_until(lambda: app.state.ask_gate.waiting == 1, WAIT_S, "the second ask never got in line")
        refused = ask("w3")  # the line (max_queued_asks=1) is full: refused at once
        assert refused.status_code == 429, refused.text
        assert 30 <= int(refused.headers["Retry-After"]) <= 60  # one to two waits in line (ask_queue_s)
        assert refused.json()["error"]["code"] == "too_many_asks"
        assert second.is_alive(), "the ask in line was answered before a turn came"
        go.set()
        first.join(WAIT_S)
        second.join(WAIT_S)
    assert first_out["result"].status_code == 200 and first_out["result"].json()["number"] == 0
    assert second_out["result"].status_code == 200 and second_out["result"].json()["number"] == 1
    assert app.state.ask_gate.waiting == 0


def test_an_ask_slower_than_its_limit_answers_sampler_slow_and_hands_the_trial_back(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.model_copy(update={"ask_timeout_s": 0.2})
    create_study(db, parse_definition(external_study("gp")))
    handed_back = threading.Event()
    real_release = leases.release

    def release(*args: Any, **kwargs: Any) -> None:
        real_release(*args, **kwargs)
        handed_back.set()

    monkeypatch.setattr("caviar.service.trials.release", release)
    with TestClient(create_app(settings, db=db)) as client, blocked_sampler(monkeypatch) as (_, go):
        slow = client.post(f"{API}/gp/trials/ask", json={"worker_id": "w1"})
        assert slow.status_code == 503 and slow.headers["Retry-After"] == "1"
        error = slow.json()["error"]
        assert error["code"] == "sampler_slow" and "ask_timeout_s" in error["message"]
        go.set()
        assert handed_back.wait(WAIT_S)
        client.app.state.settings = settings.model_copy(update={"ask_timeout_s": 600})  # type: ignore[attr-defined]
        record = load_record(db, "gp")
        first = db.optuna.get_trial(trial_id(db, record, 0))
        assert first.state == TrialState.FAIL and first.user_attrs.get(RELEASED)
        again = client.post(f"{API}/gp/trials/ask", json={"worker_id": "w1"})
        assert again.status_code == 200 and again.json()["retry_of"] == 0
        assert again.json()["params"]["dropout"] == pytest.approx(first.params["dropout"])
    assert fail_count(all_trials(db, record)) == 0  # a hand-back is no failure
    assert load_record(db, "gp").state == "running"


# ---- (d) imports in chunks: a reader under the study lock never sees a partial chunk --------


def test_an_import_writes_in_chunks_and_readers_see_only_whole_chunks(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_study(db, parse_definition(external_study("imp", n_trials=20)))
    record = load_record(db, "imp")
    importer = threading.current_thread()
    per_hold: list[int] = []
    seen_between: list[int] = []
    real_add = enqueue_module.add_trial
    real_lock = Database.study_lock

    def counting_add(*args: Any, **kwargs: Any) -> int:
        per_hold[-1] += 1
        return real_add(*args, **kwargs)

    def read_under_lock() -> int:
        with real_lock(db, record.id):
            return count_states(db, record)[TrialState.WAITING]

    @contextlib.contextmanager
    def tracking_lock(self: Database, study_id: int) -> Iterator[None]:
        if threading.current_thread() is not importer or study_id != record.id:
            with real_lock(self, study_id):
                yield
            return
        with real_lock(self, study_id):
            per_hold.append(0)
            yield
        reader, out = in_thread(read_under_lock)  # the lock is free: another reader takes it now
        reader.join(WAIT_S)
        assert not reader.is_alive(), "the import still held the study lock between its chunks"
        seen_between.append(out["result"])

    monkeypatch.setattr(enqueue_module, "add_trial", counting_add)
    monkeypatch.setattr(Database, "study_lock", tracking_lock)
    items = [EnqueueItem(params={"lr": 0.01, "beta1": 0.9, "dropout": 0.1 + i / 100}) for i in range(9)]
    added = enqueue(db, "imp", items, chunk_size=3)
    assert len(added) == 9
    assert per_hold == [3, 3, 3]  # the lock was held around one chunk at a time
    assert seen_between == [3, 6, 9]  # and a reader under it saw whole chunks only
