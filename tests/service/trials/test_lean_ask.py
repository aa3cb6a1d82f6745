"""The lean REST path: how many SQL statements an ask, a report and a tell send, and that what a
process remembers about a study never hides a change made elsewhere (SQLite and PostgreSQL).

The counts are deterministic (no timing): statements are counted with a SQLAlchemy event on every
engine of this process while one call runs, those sent to the test's own database only (the suite
drops the databases of earlier tests on a thread of this process meanwhile, on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url

from caviar.service.api import create_app
from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.store import load_record, set_intermediate_values, trial_id
from tests.conftest import IS_POSTGRES
from tests.service.helpers import external_study

API = "/api/v1/studies"

# Raw Optuna's ask + report + should_prune + tell on the same space and history sends 65
# (benchmarks/sql_statements.py); caviar's REST path, its lease and budget included, sends no more.
# PostgreSQL's ask takes the study lock with one statement more (pg_advisory_xact_lock); the
# ask's last statement restarts the lease once sampling ends (sampling holds it till then).
ASK_AT_MOST, REPORT_AT_MOST, TELL_AT_MOST = 33 + IS_POSTGRES, 12, 19
RAW_OPTUNA = 65


class Counter:
    def __init__(self, database: str | None) -> None:
        self.database = database
        self.statements: list[str] = []
        self.on = False

    def __call__(self, conn: Connection, _cursor: Any, statement: str, *_: Any) -> None:
        if self.on and conn.engine.url.database == self.database:
            self.statements.append(" ".join(statement.split())[:120])

    @contextmanager
    def counting(self) -> Iterator[list[str]]:
        self.statements = []
        self.on = True
        try:
            yield self.statements
        finally:
            self.on = False


@pytest.fixture
def counter(db_url: str) -> Iterator[Counter]:
    seen = Counter(make_url(db_url).database)
    event.listen(Engine, "before_cursor_execute", seen)
    yield seen
    event.remove(Engine, "before_cursor_execute", seen)


def app(db_url: str, tmp_path: Path, label: str) -> TestClient:
    """One service instance of its own (its own engine and pools), no background tasks."""
    settings = Settings(
        database_url=db_url,
        heartbeat_interval_s=30,
        artifact_dir=str(tmp_path / f"artifacts-{label}"),
        api_token=None,
        background_tasks=False,
    )
    return TestClient(create_app(settings, db=Database(db_url)))


def cycle(client: TestClient, name: str) -> int:
    number = client.post(f"{API}/{name}/trials/ask", json={}).json()["number"]
    report = client.post(f"{API}/{name}/trials/{number}/report", json={"step": 0, "value": 0.5})
    assert report.status_code == 200, report.text
    tell = client.post(f"{API}/{name}/trials/{number}/tell", json={"state": "complete", "value": 0.5})
    assert tell.status_code == 200, tell.text
    return number


def test_ask_report_tell_send_no_more_statements_than_raw_optuna(
    db_url: str, tmp_path: Path, counter: Counter
) -> None:
    client = app(db_url, tmp_path, "one")
    body = external_study("lean", n_trials=1000)
    body |= {"sampler": {"type": "tpe", "seed": 0}, "pruner": {"type": "median"}}
    assert client.post(API, json=body).status_code == 201
    history = [
        {"params": {"lr": 10 ** (-4 + 3 * i / 20), "beta1": 0.9, "dropout": 0.1}, "value": i % 5}
        for i in range(20)
    ]
    assert client.post(f"{API}/lean/trials/enqueue", json={"trials": history}).status_code == 201
    cycle(client, "lean")  # the process's caches and pools warm up once
    with counter.counting() as ask_statements:
        number = client.post(f"{API}/lean/trials/ask", json={}).json()["number"]
    with counter.counting() as report_statements:
        client.post(f"{API}/lean/trials/{number}/report", json={"step": 0, "value": 0.5}).raise_for_status()
    with counter.counting() as tell_statements:
        client.post(
            f"{API}/lean/trials/{number}/tell", json={"state": "complete", "value": 0.5}
        ).raise_for_status()
    assert len(ask_statements) <= ASK_AT_MOST, ask_statements
    assert len(report_statements) <= REPORT_AT_MOST, report_statements
    assert len(tell_statements) <= TELL_AT_MOST, tell_statements
    assert len(ask_statements) + len(report_statements) + len(tell_statements) <= RAW_OPTUNA
    # caviar's study row: read once by an ask (under the study lock, with the trial counts) and a
    # report (with the lease); a tell reads it before Optuna's tell and once more with the trial
    # counts to settle the study
    rows = [
        sum(s.startswith("SELECT caviar_studies.id") for s in statements)
        for statements in (ask_statements, report_statements, tell_statements)
    ]
    assert rows == [1, 1, 2], (ask_statements, report_statements, tell_statements)


def test_between_rungs_an_asha_report_reads_the_reported_trial_alone(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A successive-halving pruner reads the study's trials only at a rung: a report between rungs
    reads no other trial (every running one was read before: 56% of a report's CPU in a fused group)."""
    client = app(db_url, tmp_path, "one")
    body = external_study("rungs", n_trials=10) | {"pruner": {"type": "asha"}}
    assert client.post(API, json=body).status_code == 201
    numbers = [client.post(f"{API}/rungs/trials/ask", json={}).json()["number"] for _ in range(3)]
    storage = client.app.state.db.optuna  # type: ignore[attr-defined]
    reads: list[int] = []
    real = storage.get_all_trials

    def history_read(study_id: int, *args: Any, **kwargs: Any) -> Any:
        reads.append(study_id)
        return real(study_id, *args, **kwargs)

    monkeypatch.setattr(storage, "get_all_trials", history_read)

    def report(number: int, step: int) -> bool:
        answer = client.post(f"{API}/rungs/trials/{number}/report", json={"step": step, "value": 0.5})
        assert answer.status_code == 200, answer.text
        return bool(answer.json()["should_prune"])

    report(numbers[0], 0)  # before the first rung (steps 1, 3, 9, ...)
    assert reads == []
    report(numbers[0], 1)  # the first rung: the pruner ranks the trial against the study's
    assert reads
    read_at_rung = len(reads)
    assert not report(numbers[0], 2)  # between rungs again
    assert len(reads) == read_at_rung


def test_a_change_through_one_app_is_seen_by_another_at_once(db_url: str, tmp_path: Path) -> None:
    """Caches are validated by their readers, never invalidated by the writer: what app 2 (its own
    engine, as another process has) remembers never hides what app 1 changed a moment ago."""
    one, two = app(db_url, tmp_path, "one"), app(db_url, tmp_path, "two")
    assert one.post(API, json=external_study("s", n_trials=10)).status_code == 201
    first = cycle(two, "s")  # app 2 remembers the study (its id, definition, Optuna handle)
    assert first == 0
    # a pause through app 1: app 2's next ask is refused
    assert one.post(f"{API}/s/pause").status_code == 200
    paused = two.post(f"{API}/s/trials/ask", json={})
    assert paused.status_code == 409 and paused.json()["error"]["code"] == "study_paused"
    assert one.post(f"{API}/s/resume").status_code == 200
    # a budget edit through app 1 (a new definition revision): app 2 applies it at once
    assert one.patch(f"{API}/s", json={"budget": {"n_trials": 1}}).status_code == 200
    spent = two.post(f"{API}/s/trials/ask", json={})
    assert spent.status_code == 409 and spent.json()["error"]["code"] == "budget_exhausted"
    # deleted and created again under the same name, with another space: app 2 asks the new study
    assert one.delete(f"{API}/s").status_code == 204
    again = external_study("s", n_trials=10)
    again["search_space"] = {"width": {"type": "int", "low": 1, "high": 8}}
    assert one.post(API, json=again).status_code == 201
    fresh = two.post(f"{API}/s/trials/ask", json={})
    assert fresh.status_code == 200, fresh.text
    assert fresh.json()["number"] == 0 and set(fresh.json()["params"]) == {"width"}
    report = two.post(f"{API}/s/trials/0/report", json={"step": 0, "value": 1.0})
    assert report.status_code == 200, report.text
    told = two.post(f"{API}/s/trials/0/tell", json={"state": "complete", "value": 1.0})
    assert told.status_code == 200 and told.json()["params"] == fresh.json()["params"], told.text
    # and deleted for good: app 2 answers 404, not a stale trial
    assert one.delete(f"{API}/s").status_code == 204
    gone = two.post(f"{API}/s/trials/ask", json={})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "study_not_found"


def run_curves(client: TestClient, name: str, *, batch: bool) -> list[list[bool]]:
    """Complete 3 trials, then train 8 more for 6 steps: each step reports every live one (one by one,
    or in one batch), and a pruned one is told pruned. Returns each step's answers."""
    for m in range(3):
        number = client.post(f"{API}/{name}/trials/ask", json={}).json()["number"]
        for step in range(6):
            client.post(f"{API}/{name}/trials/{number}/report", json={"step": step, "value": 0.3 + 0.1 * m})
        client.post(f"{API}/{name}/trials/{number}/tell", json={"state": "complete", "value": 0.3 + 0.1 * m})
    live = [client.post(f"{API}/{name}/trials/ask", json={}).json()["number"] for _ in range(8)]
    steps = []
    for step in range(6):
        values = [(n, (n * 37 % 8) / 10 + 0.01 * step) for n in live]  # members in no order of value
        if batch:
            reports = [{"number": n, "step": step, "value": v} for n, v in values]
            answer = client.post(f"{API}/{name}/trials/reports", json={"reports": reports})
            assert answer.status_code == 200, answer.text
            assert [r["code"] for r in answer.json()["results"]] == [None] * len(values)
            answers = [r["should_prune"] for r in answer.json()["results"]]
        else:
            answers = [
                client.post(f"{API}/{name}/trials/{n}/report", json={"step": step, "value": v}).json()[
                    "should_prune"
                ]
                for n, v in values
            ]
        steps.append(answers)
        for (number, _), prune in zip(values, answers, strict=True):
            if prune:
                client.post(f"{API}/{name}/trials/{number}/tell", json={"state": "pruned"})
                live.remove(number)
    return steps


@pytest.mark.parametrize("pruner", [{"type": "asha"}, {"type": "median", "options": {"n_startup_trials": 2}}])
def test_a_batch_of_reports_answers_what_reports_one_by_one_answer(
    db_url: str, tmp_path: Path, pruner: dict[str, Any]
) -> None:
    """The batch stores every value first and asks the pruner after, in order: the same answers."""
    client = app(db_url, tmp_path, "batch")
    for name in ("one-by-one", "batched"):
        body = external_study(name, n_trials=20) | {"pruner": pruner}
        assert client.post(API, json=body).status_code == 201
    one_by_one = run_curves(client, "one-by-one", batch=False)
    assert one_by_one == run_curves(client, "batched", batch=True)
    assert any(any(step) for step in one_by_one)  # some were pruned: the comparison is not vacuous


def test_a_batch_of_asha_reports_reads_its_trials_in_one_go(
    db_url: str, tmp_path: Path, counter: Counter
) -> None:
    """Eight reports between rungs: as eight requests, each reads its trial (six statements); as one
    batch, one read loads all eight."""
    client = app(db_url, tmp_path, "one-read")
    body = external_study("rungs", n_trials=20) | {"pruner": {"type": "asha"}}
    assert client.post(API, json=body).status_code == 201
    numbers = [client.post(f"{API}/rungs/trials/ask", json={}).json()["number"] for _ in range(16)]
    with counter.counting() as singles:
        for number in numbers[:8]:
            report = client.post(f"{API}/rungs/trials/{number}/report", json={"step": 0, "value": 0.5})
            assert report.json() == {"should_prune": False}
    reports = [{"number": n, "step": 0, "value": 0.5} for n in numbers[8:]]
    with counter.counting() as batch:
        answer = client.post(f"{API}/rungs/trials/reports", json={"reports": reports})
        assert [r["should_prune"] for r in answer.json()["results"]] == [False] * 8
    assert len(batch) <= len(singles) // 2  # 33 against 80 (2026-12-08; 39 before row_and_leases)


def test_a_batch_of_reports_reads_the_study_row_and_its_leases_in_two_statements(
    db_url: str, tmp_path: Path, counter: Counter
) -> None:
    """One report reads the study row with its trial's lease (one statement); a batch of eight reads
    the row once and the eight leases in one statement, not eight."""
    client = app(db_url, tmp_path, "batch-leases")
    body = external_study("leases", n_trials=20) | {"pruner": {"type": "asha"}}
    assert client.post(API, json=body).status_code == 201
    numbers = [client.post(f"{API}/leases/trials/ask", json={}).json()["number"] for _ in range(8)]
    reports = [{"number": n, "step": 0, "value": 0.5} for n in numbers]
    with counter.counting() as batch:
        answer = client.post(f"{API}/leases/trials/reports", json={"reports": reports})
    assert [r["code"] for r in answer.json()["results"]] == [None] * 8
    ours = [s for s in batch if "caviar_studies" in s or "caviar_trial_leases" in s]
    assert len(ours) == 2, ours


def test_a_tells_user_attributes_are_written_in_one_transaction(db_url: str, tmp_path: Path) -> None:
    """A trainer's tell carries seven user attributes: one transaction for them all, where Optuna's
    ``set_trial_user_attr`` commits once per attribute; and they are all on the trial."""
    client = app(db_url, tmp_path, "attrs")
    assert client.post(API, json=external_study("attrs", n_trials=4)).status_code == 201
    database = make_url(db_url).database
    commits: list[str] = []

    def committed(conn: Connection) -> None:
        if conn.engine.url.database == database:
            commits.append("commit")

    attrs = {"epochs": 15, "train_seconds": 1.5, "device": "cpu", "worker": "w", "a": 1, "b": 2, "c": 3}
    counted: list[int] = []
    event.listen(Engine, "commit", committed)
    try:
        for user_attrs in ({}, attrs):
            number = client.post(f"{API}/attrs/trials/ask", json={}).json()["number"]
            commits.clear()
            body = {"state": "complete", "value": 0.5, "user_attrs": user_attrs}
            told = client.post(f"{API}/attrs/trials/{number}/tell", json=body)
            assert told.status_code == 200, told.text
            counted.append(len(commits))
    finally:
        event.remove(Engine, "commit", committed)
    assert counted[1] == counted[0] + 1, counted
    trial = client.get(f"{API}/attrs/trials/{number}").json()
    assert {k: trial["user_attrs"][k] for k in attrs} == attrs


def test_a_batch_of_reports_writes_its_values_in_one_transaction(db_url: str, tmp_path: Path) -> None:
    """Eight values of a batch commit as one (as many commits as a batch of one report), where
    Optuna's ``set_trial_intermediate_value`` commits once per value."""
    client = app(db_url, tmp_path, "one-write")
    assert client.post(API, json=external_study("write", n_trials=20)).status_code == 201
    numbers = [client.post(f"{API}/write/trials/ask", json={}).json()["number"] for _ in range(9)]
    database = make_url(db_url).database
    commits: list[int] = []

    def committed(conn: Connection) -> None:
        if conn.engine.url.database == database:
            commits.append(1)

    counted: list[int] = []
    event.listen(Engine, "commit", committed)
    try:
        for batch in (numbers[:1], numbers[1:]):
            commits.clear()
            reports = [{"number": n, "step": 0, "value": 0.5 + n / 100} for n in batch]
            answer = client.post(f"{API}/write/trials/reports", json={"reports": reports})
            assert [r["code"] for r in answer.json()["results"]] == [None] * len(batch)
            counted.append(len(commits))
    finally:
        event.remove(Engine, "commit", committed)
    assert counted[1] == counted[0], counted
    for n in numbers:
        trial = client.get(f"{API}/write/trials/{n}").json()
        assert trial["intermediate_values"] == {"0": 0.5 + n / 100}


def test_values_written_together_skip_a_finished_trial(db_url: str, tmp_path: Path) -> None:
    """One finished trial among running ones: its value is refused (and named), the others' written."""
    client = app(db_url, tmp_path, "skip")
    assert client.post(API, json=external_study("skip", n_trials=4)).status_code == 201
    done, running = (client.post(f"{API}/skip/trials/ask", json={}).json()["number"] for _ in range(2))
    told = client.post(f"{API}/skip/trials/{done}/tell", json={"state": "complete", "value": 0.5})
    assert told.status_code == 200
    db = Database(db_url)
    record = load_record(db, "skip")
    ids = [trial_id(db, record, number) for number in (done, running)]
    assert set_intermediate_values(db, [(ids[0], 3, 0.1), (ids[1], 3, 0.2)]) == {ids[0]}
    assert client.get(f"{API}/skip/trials/{done}").json()["intermediate_values"] == {}
    assert client.get(f"{API}/skip/trials/{running}").json()["intermediate_values"] == {"3": 0.2}
