"""End-to-end faults of ``caviar worker``: signals, killed and crashed slots, racing workers, a stop
while a fused group trains, a PostgreSQL restart. Heartbeats are shortened so crashed trials are
reaped fast (fixtures in ``conftest.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from caviar.service import store, trials
from caviar.service.db import Database
from caviar.service.processes import CaviarProcess, wait_until
from caviar.storage import WorkerRecord
from tests.conftest import IS_POSTGRES
from tests.worker.conftest import Service, busy_slot, digits_study, finished_counts

pytestmark = pytest.mark.slow


def test_sigterm_hands_the_trial_back_and_exits_0(
    db: Database, serve: Callable[..., Service], spawn: Callable[..., CaviarProcess]
) -> None:
    service = serve(heartbeat=2.0)
    store.create_study(db, store.parse_definition(digits_study("term", n_trials=4, max_epochs=200)))
    workers = spawn(service, "--cpu", "1", "--study", "term")
    wait_until(lambda: busy_slot(db, "term") is not None, 60, "no trial started")
    _, number = busy_slot(db, "term")  # type: ignore[misc]
    started = time.monotonic()
    workers.signal(signal.SIGTERM)
    assert workers.wait(15) == 0, workers.output()
    assert time.monotonic() - started < 10
    handed_back = trials.get_trial(db, "term", number)
    assert handed_back.state == "fail" and "handed back" in (handed_back.fail_reason or "")
    waiting = trials.list_trials(db, "term", state="waiting").items
    assert [t.retry_of for t in waiting] == [number]
    assert waiting[0].params == handed_back.params


def test_sigkill_mid_trial_is_reaped_and_retried(
    db: Database, serve: Callable[..., Service], spawn: Callable[..., CaviarProcess]
) -> None:
    service = serve(heartbeat=0.3)
    store.create_study(db, store.parse_definition(digits_study("kill", n_trials=4, max_epochs=40)))
    workers = spawn(service, "--cpu", "2", "--study", "kill", "--exit-when-idle", "3", "--log-format", "json")
    wait_until(lambda: busy_slot(db, "kill") is not None, 60, "no trial started")
    pid, number = busy_slot(db, "kill")  # type: ignore[misc]
    os.kill(pid, signal.SIGKILL)
    assert workers.wait(240) == 0, workers.output()
    counts = finished_counts(db, "kill")
    assert counts["complete"] + counts["pruned"] == 4, counts
    assert counts["running"] == 0 and counts["waiting"] == 0
    killed = trials.get_trial(db, "kill", number)
    assert killed.state == "fail" and "lease expired" in (killed.fail_reason or "")
    retries = [t for t in trials.list_trials(db, "kill", limit=1000).items if t.retry_of == number]
    assert len(retries) == 1 and retries[0].state in ("complete", "pruned")
    assert store.load_record(db, "kill").state == "completed"
    # the supervisor restarted the killed slot; every line, the slots' included, is one JSON object
    lines = [json.loads(line) for line in workers.log_path.read_text().splitlines() if line.strip()]
    (restart,) = [e for e in lines if "restarting" in e["message"]]
    assert (restart["level"], restart["exit_code"], restart["device"]) == ("WARNING", -signal.SIGKILL, "cpu")
    assert restart["restart_in_s"] == 1.0 and restart["slot"] in (0, 1)


def test_four_workers_racing_keep_the_budget_exact(
    db: Database, serve: Callable[..., Service], spawn: Callable[..., CaviarProcess]
) -> None:
    service = serve(heartbeat=2.0)
    store.create_study(db, store.parse_definition(digits_study("race4", n_trials=8, max_epochs=5, fuse=2)))
    workers = spawn(service, "--cpu", "4", "--study", "race4", "--exit-when-idle", "2")
    assert workers.wait(240) == 0, workers.output()
    items = trials.list_trials(db, "race4", limit=1000).items
    finished = [t for t in items if t.state in ("complete", "pruned")]
    assert len(finished) == 8, [t.state for t in items]
    failed = [t for t in items if t.state == "fail"]  # only a lapsed lease under load fails a trial here
    assert {t.number for t in failed} <= {t.retry_of for t in items}
    assert store.load_record(db, "race4").state == "completed"


def test_stop_while_a_fused_group_trains_ends_every_member(
    db: Database, serve: Callable[..., Service], spawn: Callable[..., CaviarProcess]
) -> None:
    """POST /stop while 4 fused members train (and 2 enqueued trials wait): the worker prunes every
    member at its next report, the waiting ones are cancelled, the study ends stopped."""
    service = serve(heartbeat=1.0)
    body = digits_study("stopfuse", n_trials=20, max_epochs=5000, fuse=4)
    body["pruner"] = {"type": "none"}
    body["sampler"] = {"type": "random", "seed": 0}  # no warm-up trials: the first group is fused
    api = f"{service.url}/api/v1/studies/stopfuse"
    assert httpx.post(f"{service.url}/api/v1/studies", json=body, timeout=30).status_code == 201
    workers = spawn(service, "--cpu", "1", "--study", "stopfuse", "--exit-when-idle", "3")

    def training() -> list[int]:
        running = trials.list_trials(db, "stopfuse", state="running").items
        return [t.number for t in running if t.intermediate_values]

    wait_until(lambda: len(training()) == 4, 120, "the fused group did not start training")
    members = training()
    params = {k: v for k, v in trials.get_trial(db, "stopfuse", members[0]).params.items()}
    enqueued = httpx.post(f"{api}/trials/enqueue", json={"trials": [{"params": params}] * 2}, timeout=30)
    assert enqueued.status_code == 201, enqueued.text
    asked = time.monotonic()
    stopped = httpx.post(f"{api}/stop", timeout=30)
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopping", stopped.text
    wait_until(lambda: store.load_record(db, "stopfuse").state == "stopped", 60, "the study did not stop")
    assert time.monotonic() - asked < 20
    counts = finished_counts(db, "stopfuse")
    assert counts["running"] == 0 and counts["waiting"] == 0, counts
    for number in members:  # told pruned by the worker, not reaped
        member = trials.get_trial(db, "stopfuse", number)
        assert member.state == "pruned", (number, member.state, member.fail_reason)
    cancelled = [t for t in trials.list_trials(db, "stopfuse", state="fail").items]
    assert len(cancelled) == 2 and all("cancelled" in (t.fail_reason or "") for t in cancelled)
    assert workers.wait(60) == 0, workers.output()


def _pg_restart_command() -> list[str] | None:
    if (
        not IS_POSTGRES
        or os.geteuid() != 0
        or not shutil.which("pg_ctlcluster")
        or not Path("/etc/postgresql").exists()
    ):
        return None
    version = sorted(os.listdir("/etc/postgresql"))[0]
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"]


@pytest.mark.serial  # the restart would break the tests running beside it under pytest-xdist
@pytest.mark.skipif(
    _pg_restart_command() is None, reason="needs a local PostgreSQL cluster it may restart (root)"
)
def test_postgres_restart_mid_study_workers_recover(
    db: Database, serve: Callable[..., Service], spawn: Callable[..., CaviarProcess]
) -> None:
    service = serve(heartbeat=1.0)
    store.create_study(db, store.parse_definition(digits_study("pgr", n_trials=10, max_epochs=15)))
    workers = spawn(service, "--cpu", "2", "--study", "pgr", "--exit-when-idle", "3")
    wait_until(
        lambda: finished_counts(db, "pgr")["complete"] + finished_counts(db, "pgr")["pruned"] >= 2,
        120,
        "no progress",
    )
    command = _pg_restart_command()
    assert command is not None
    subprocess.run(command, check=True, timeout=120)
    assert workers.wait(300) == 0, workers.output()
    counts = finished_counts(db, "pgr")
    assert counts["complete"] + counts["pruned"] == 10, counts
    assert store.load_record(db, "pgr").state == "completed"


def test_a_crashed_slot_is_restarted_and_finishes_the_study(
    db: Database, serve: Callable[..., Service], spawn: Callable[..., CaviarProcess]
) -> None:
    """The only slot of `caviar worker --cpu 1` is killed mid-trial: the supervisor starts a new slot
    process (a new pid registers), which runs the reaped trial's retry and the rest of the study."""
    # leases of 2 s: short enough to reap the killed slot's trial at once, long enough that a
    # loaded machine (CI runs two test processes) does not reap the live slot's trials too
    service = serve(heartbeat=1.0)
    # trials long enough to span heartbeats: the slot's record shows a trial only at a heartbeat
    # (3 epochs could finish the whole study between two, and the test then saw no trial start)
    body = digits_study("crash", n_trials=3, max_epochs=40)
    body["pruner"] = {"type": "none"}
    store.create_study(db, store.parse_definition(body))
    workers = spawn(service, "--cpu", "1", "--study", "crash", "--exit-when-idle", "3")
    wait_until(lambda: busy_slot(db, "crash") is not None, 60, "no trial started")
    pid, _ = busy_slot(db, "crash")  # type: ignore[misc]
    os.kill(pid, signal.SIGKILL)
    assert workers.wait(120) == 0, workers.output()
    with db.session() as session:
        pids = {record.pid for record in session.scalars(select(WorkerRecord))}
    assert pid in pids and len(pids) == 2, pids  # the killed slot and its replacement
    assert "restarting" in workers.output()
    # the slot's record is as old as its last heartbeat: it may have moved on to its next trial, so
    # the killed trial is the one the reaper failed, not the one the record named
    items = trials.list_trials(db, "crash", limit=100).items
    (reaped,) = [t for t in items if t.state == "fail"]
    assert [t.state for t in items if t.retry_of == reaped.number] == ["complete"]
    assert finished_counts(db, "crash")["complete"] == 3
    assert store.load_record(db, "crash").state == "completed"
