"""End-to-end tests of ``caviar worker``: real processes against a real ``caviar serve``.

Each test starts the API on the database under test and workers as the CLI does (``caviar worker
--url ...``, with no database URL in their environment), and watches the study through the
domain functions. Heartbeats are shortened so crashed trials are reaped fast.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select

from caviar.service import processes, store, trials
from caviar.service.db import Database
from caviar.service.examples import example_path
from caviar.service.processes import CaviarProcess, wait_until
from caviar.service.studies import service as studies
from caviar.storage import WorkerRecord
from caviar.worker import discover_slots
from tests.conftest import IS_POSTGRES

pytestmark = pytest.mark.slow


def digits_study(
    name: str, *, n_trials: int, max_epochs: int = 15, fuse: int | None = None
) -> dict[str, Any]:
    """The example study, kept small: Adam/RMSProp with sane learning rates."""
    body = copy.deepcopy(yaml.safe_load(example_path("digits-mlp").read_text()))
    body["name"] = name
    body["search_space"]["lr"] = {"type": "float", "low": 5e-4, "high": 2e-2, "scale": "log"}
    body["search_space"]["optimizer"] = {"type": "categorical", "choices": ["adam", "rmsprop", "momentum"]}
    body["search_space"]["batch_size"] = {"type": "categorical", "choices": [32, 64]}
    body["objective"]["max_epochs"] = max_epochs
    body["objective"]["fuse"] = fuse
    body["budget"].update(n_trials=n_trials, max_parallel=8, max_failed_trials=20)
    return body


@dataclass
class Service:
    """A running ``caviar serve`` on the test database."""

    process: CaviarProcess
    url: str


@pytest.fixture
def serve(db_url: str, tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Start the API (heartbeat interval as given; the reaper runs every half interval)."""
    started: list[CaviarProcess] = []

    def start(heartbeat: float = 0.5) -> Service:
        env = {
            "CAVIAR_HEARTBEAT_INTERVAL_S": str(heartbeat),
            "CAVIAR_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        }
        process, url = processes.serve(db_url, env=env, log=tmp_path / "serve.log")
        started.append(process)
        return Service(process, url)

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., CaviarProcess]]:
    """Start ``caviar worker`` against a service, with no database URL in its environment."""
    started: list[CaviarProcess] = []

    def start(service: Service, *args: str) -> CaviarProcess:
        command = ["worker", "--url", service.url, "--gpus", "none", "--poll-interval", "0.2", *args]
        log = tmp_path / f"worker-{time.monotonic_ns()}.log"
        workers = CaviarProcess(command, unset=("CAVIAR_DATABASE_URL",), log=log, cwd=tmp_path)
        started.append(workers)
        return workers

    yield start
    for workers in started:
        workers.stop()


def finished_counts(db: Database, name: str) -> dict[str, int]:
    return studies.describe(db, store.load_record(db, name)).trial_counts.model_dump()


def busy_slot(db: Database, name: str) -> tuple[int, int] | None:
    """(pid, trial number) of a slot currently training a trial of ``name``."""
    with db.session() as session:
        for record in session.scalars(select(WorkerRecord)):
            for trial in (record.current_trials or {}).get("trials", []):
                if trial["study"] == name and record.status == "busy":
                    return record.pid, trial["number"]
    return None


def test_discover_slots() -> None:
    assert discover_slots("none", 1, None) == ["cpu"]
    assert discover_slots("none", 1, 3) == ["cpu", "cpu", "cpu"]
    assert discover_slots("all", 2, None, available=0) == ["cpu"]
    assert discover_slots("all", 2, None, available=2) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert discover_slots("1", 1, 1, available=2) == ["cuda:1", "cpu"]
    with pytest.raises(ValueError, match="gpus"):
        discover_slots("x,y", 1, None, available=2)
    with pytest.raises(ValueError, match="not visible"):
        discover_slots("7", 1, 0, available=2)


@pytest.mark.parametrize(("cuda", "count", "expected"), [(True, 3, 3), (False, 3, 0), (True, 0, 0)])
def test_discover_slots_all_asks_torch_for_the_visible_gpus(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, count: int, expected: int
) -> None:
    """With no ``available`` given, ``all`` means the GPUs torch sees (none when CUDA is off)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    cuda_slots = [f"cuda:{i}" for i in range(expected)]
    assert discover_slots("all", 1, 0) == cuda_slots
    assert discover_slots("all", 2, 1) == [s for s in cuda_slots for _ in range(2)] + ["cpu"]
    assert discover_slots("all", 1, None) == (cuda_slots or ["cpu"])
    if expected:
        assert discover_slots("2", 1, 0) == ["cuda:2"]
    with pytest.raises(ValueError, match="not visible"):
        discover_slots(str(expected), 1, 0)


def test_service_and_two_workers_finish_a_digits_study(
    db: Database, serve: Callable[..., Service], spawn: Callable[..., CaviarProcess], tmp_path: Path
) -> None:
    """The API serves while 2 CPU workers (no database URL) run a 16-trial study: best >= 0.95,
    some pruned, checkpoints downloadable."""
    service = serve()
    created = httpx.post(
        f"{service.url}/api/v1/studies", json=digits_study("e2e", n_trials=16, fuse=2), timeout=30
    )
    assert created.status_code == 201, created.text
    workers = spawn(service, "--cpu", "2", "--study", "e2e", "--exit-when-idle", "2")
    assert workers.wait(240) == 0, workers.output()
    study = httpx.get(f"{service.url}/api/v1/studies/e2e", timeout=30).json()
    counts = study["trial_counts"]
    assert study["state"] == "completed", study
    assert counts["complete"] + counts["pruned"] == 16 and counts["running"] == 0
    assert counts["pruned"] >= 1, counts
    assert study["best"]["value"] >= 0.95, study["best"]
    best = httpx.get(f"{service.url}/api/v1/studies/e2e/best", timeout=30).json()
    assert best["user_attrs"]["device"] == "cpu" and best["user_attrs"]["epochs"] >= 1
    assert "train_seconds" in best["user_attrs"] and best["worker_id"]
    assert 0.8 <= best["params"]["beta1"] <= 0.999
    listed = httpx.get(f"{service.url}/api/v1/workers", timeout=30).json()
    assert len(listed["items"]) == 2 and {w["device"] for w in listed["items"]} == {"cpu"}
    assert {w["status"] for w in listed["items"]} == {"stopped"}
    checkpoint = httpx.get(f"{service.url}/api/v1/studies/e2e/trials/{best['number']}/checkpoint", timeout=30)
    assert checkpoint.status_code == 200, checkpoint.text
    target = tmp_path / "best.pt"
    target.write_bytes(checkpoint.content)
    from sklearn.datasets import load_digits

    from caviar.trainer import load_model

    digits = load_digits()
    predicted = load_model(target).predict(digits.data[:200])
    assert (predicted == digits.target[:200]).mean() >= 0.9


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
    store.create_study(db, store.parse_definition(digits_study("kill", n_trials=6, max_epochs=40)))
    workers = spawn(service, "--cpu", "2", "--study", "kill", "--exit-when-idle", "3", "--log-format", "json")
    wait_until(lambda: busy_slot(db, "kill") is not None, 60, "no trial started")
    pid, number = busy_slot(db, "kill")  # type: ignore[misc]
    os.kill(pid, signal.SIGKILL)
    assert workers.wait(240) == 0, workers.output()
    counts = finished_counts(db, "kill")
    assert counts["complete"] + counts["pruned"] == 6, counts
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
    store.create_study(db, store.parse_definition(digits_study("race4", n_trials=12, max_epochs=5, fuse=2)))
    workers = spawn(service, "--cpu", "4", "--study", "race4", "--exit-when-idle", "2")
    assert workers.wait(240) == 0, workers.output()
    items = trials.list_trials(db, "race4", limit=1000).items
    finished = [t for t in items if t.state in ("complete", "pruned")]
    assert len(finished) == 12, [t.state for t in items]
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


def test_a_diverging_trial_fails_with_its_reason_and_the_worker_goes_on(
    db: Database, serve: Callable[..., Service], spawn: Callable[..., CaviarProcess]
) -> None:
    service = serve()
    body = digits_study("nan", n_trials=2, max_epochs=3)
    body["search_space"] = {"lr": {"type": "float", "low": 1e6, "high": 1e7, "scale": "log"}}
    body["objective"]["fixed"] = {"layers": 2, "optimizer": "sgd", "batch_size": 64}
    body["pruner"] = {"type": "none"}
    body["budget"].update(max_retries=1, max_failed_trials=3)
    store.create_study(db, store.parse_definition(body))
    workers = spawn(service, "--cpu", "1", "--study", "nan", "--exit-when-idle", "2")
    assert workers.wait(120) == 0, workers.output()
    failed = trials.list_trials(db, "nan", state="fail", limit=100).items
    assert len(failed) == 4 and all("diverged" in (t.fail_reason or "") for t in failed)
    assert store.load_record(db, "nan").state == "failed"


def test_file_datasets_are_read_under_the_data_root_and_never_quoted(
    db: Database, serve: Callable[..., Service], spawn: Callable[..., CaviarProcess], tmp_path: Path
) -> None:
    """Regression: a study could make a worker read any file and report its contents."""
    secret = "CAVIAR_API_TOKEN=s3cr3t-value"
    root = tmp_path / "data"
    root.mkdir()
    (root / "leaky.csv").write_text(f"{secret},b\n1,2\n3,4\n")  # no target column
    (tmp_path / "outside.csv").write_text(f"{secret},target\n1,0\n2,1\n")
    os.symlink(tmp_path / "outside.csv", root / "escape.csv")
    for name, dataset in (("leaky", "file:leaky.csv"), ("escape", "file:escape.csv")):
        body = digits_study(name, n_trials=1, max_epochs=1)
        body["objective"]["dataset"] = dataset
        body["budget"].update(max_retries=0, max_failed_trials=0)
        store.create_study(db, store.parse_definition(body))
    service = serve()
    workers = spawn(service, "--cpu", "1", "--exit-when-idle", "2", "--data-dir", str(root))
    assert workers.wait(120) == 0, workers.output()
    leaky = trials.list_trials(db, "leaky", state="fail").items[0].fail_reason or ""
    escape = trials.list_trials(db, "escape", state="fail").items[0].fail_reason or ""
    assert "no target column" in leaky and "2 columns" in leaky
    assert "not available in this worker's data root" in escape
    for reason in (leaky, escape):
        assert secret not in reason and str(tmp_path) not in reason
    assert secret not in workers.output()


# ---- one slot in this process, against a live service in this process ------------------------


@pytest.fixture
def live(settings, db, tmp_path: Path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A live service in this process (leases of 1 s, the reaper every 0.25 s)."""
    from caviar.service.api import create_app
    from tests.service.test_dashboard import free_port, live_server

    fast = settings.model_copy(
        update={
            "heartbeat_interval_s": 0.5,
            "artifact_dir": str(tmp_path / "artifacts"),
            "background_tasks": True,
        }
    )
    with live_server(create_app(fast, db=db), free_port()) as base:
        yield base


@pytest.fixture
def steady(settings, db, tmp_path: Path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A live service in this process whose leases (20 s) outlast any epoch on a loaded machine."""
    from caviar.service.api import create_app
    from tests.service.test_dashboard import free_port, live_server

    update = {"heartbeat_interval_s": 10.0, "artifact_dir": str(tmp_path / "artifacts")}
    with live_server(create_app(settings.model_copy(update=update), db=db), free_port()) as base:
        yield base


def run_slot_in_thread(url: str, timeout: float, **options: Any) -> Any:
    """Run one CPU slot (``caviar.worker._slot.Slot``) until it idles out; stop it after ``timeout``."""
    import threading

    from caviar.worker._options import WorkerOptions
    from caviar.worker._slot import Slot

    slot = Slot(
        WorkerOptions(
            url=url, gpus="none", cpu=1, poll_interval_s=0.1, exit_when_idle_s=1.5, retry_s=10, **options
        ),
        "cpu",
        threads=1,
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            slot.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        slot.stop.set()
        thread.join(30)
        pytest.fail(f"the slot did not finish in {timeout} s")
    assert not errors, errors
    return slot


def test_out_of_memory_halves_the_fused_group_and_the_trials_still_finish(
    db: Database, live: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fused group of 4 that runs out of device memory in its training step is handed back; the
    slot fuses 2 from then on and every trial finishes (the OOM is raised by the optimizer step)."""
    import torch

    from caviar.trainer._optim import FusedOptimizer

    body = digits_study("oom", n_trials=6, max_epochs=2, fuse=4)
    body["sampler"] = {"type": "random", "seed": 0}  # no start-up trials: the first group is fused
    body["pruner"] = {"type": "none"}
    # a hand-back is no failure and uses no retry: with none allowed, a failed member would end the study
    body["budget"].update(max_retries=0, max_failed_trials=0)
    store.create_study(db, store.parse_definition(body))
    sizes: list[int] = []
    step = FusedOptimizer.step

    def step_or_oom(self: FusedOptimizer) -> None:
        sizes.append(len(self.lr))
        if len(self.lr) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        step(self)

    monkeypatch.setattr(FusedOptimizer, "step", step_or_oom)
    slot = run_slot_in_thread(live, 120, fuse=4)
    assert slot.runners["trainer"].max_fuse == 2
    assert sizes[0] == 4 and sizes.count(4) == 1  # one OOM, then never 4 again
    after = sizes[1:]
    assert after and max(after) == 2, sorted(set(after))
    items = trials.list_trials(db, "oom", limit=1000).items
    handed_back = [t for t in items if t.state == "fail"]
    assert len(handed_back) == 4 and all("out of memory" in (t.fail_reason or "") for t in handed_back)
    assert sorted(t.retry_of for t in items if t.retry_of is not None) == sorted(
        t.number for t in handed_back
    )
    assert sum(1 for t in items if t.state == "complete") == 6
    assert store.load_record(db, "oom").state == "completed"


def test_asha_stops_the_bottom_of_a_fused_cohort_and_refills_its_places(
    db: Database, steady: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no pruner named (asha), a fused group of 4 ranks its members at each rung: at step 1 the
    bottom three of the first cohort stop before any trial has finished, and every stopped member's
    place is taken by a new trial at once, so the group trains 4 members while the budget lasts."""
    from caviar.worker import _trainer
    from caviar.worker._slot import Slot

    body = digits_study("asha", n_trials=16, max_epochs=4, fuse=4)
    body["search_space"] = {k: body["search_space"][k] for k in ("lr", "dropout")}  # all fusible
    body["objective"]["fixed"] = {"layers": 1, "hidden_units": 16, "batch_size": 64, "optimizer": "adam"}
    body["sampler"] = {"type": "random", "seed": 0}  # no start-up trials: the first group is fused
    del body["pruner"]
    store.create_study(db, store.parse_definition(body))
    claimed = [0]
    ask = Slot.ask

    def counting_ask(self: Slot, study: str, **kwargs: Any) -> Any:
        trial = ask(self, study, **kwargs)
        claimed[0] += trial is not None
        return trial

    epochs: list[tuple[int, int, list[int], set[int]]] = []  # (claimed, complete, steps, stopped)
    decide = _trainer.decide_epoch

    def recording_decide(entries: list[tuple[int, int, float]], *args: Any) -> set[int]:
        stopped = decide(entries, *args)
        done = finished_counts(db, "asha")["complete"]
        epochs.append((claimed[0], done, [step for _, step, _ in entries], stopped))
        return stopped

    monkeypatch.setattr(Slot, "ask", counting_ask)
    monkeypatch.setattr(_trainer, "decide_epoch", recording_decide)
    run_slot_in_thread(steady, 300, fuse=4)
    first_rung = next(e for e in epochs if 1 in e[2])
    assert first_rung[2] == [1, 1, 1, 1] and first_rung[1] == 0  # the first cohort, nothing finished yet
    assert len(first_rung[3]) >= 3  # 4 // 3 = 1 goes on
    while_budget_lasts = [e for e in epochs if e[0] < 16]
    assert while_budget_lasts and all(len(steps) == 4 for _, _, steps, _ in while_budget_lasts), epochs
    assert any(len(set(steps)) > 1 for _, _, steps, _ in epochs)  # refills train beside the rest
    counts = finished_counts(db, "asha")
    assert counts["complete"] + counts["pruned"] == 16 and counts["pruned"] >= 3, counts
    assert store.load_record(db, "asha").state == "completed"


def test_a_slot_that_loses_a_lease_mid_training_stops_that_trial_and_records_nothing(
    db: Database, live: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial 0's lease lapses while it trains (no heartbeat for it, its first epoch takes 2.5 s):
    the reaper fails it, another worker takes the retry, and the slot then stops training trial 0
    at its next report and never tells it (nor the retry) anything."""
    from caviar._client import Trial
    from caviar.worker._api import WorkerApi
    from caviar.worker._slot import Slot

    body = digits_study("lease", n_trials=2, max_epochs=4)
    body["sampler"] = {"type": "random", "seed": 0}
    body["pruner"] = {"type": "none"}
    body["budget"]["max_parallel"] = 4
    store.create_study(db, store.parse_definition(body))
    api = f"{live}/api/v1/studies/lease"
    calls: list[tuple[str, int]] = []
    retry: dict[str, Any] = {}
    answers: list[bool] = []  # the slot's prune decisions for trial 0

    for method in ("tell", "prune", "fail", "release", "report"):
        original = getattr(Trial, method)

        def recording(
            self: Trial, *args: Any, _name: str = method, _original: Any = original, **kwargs: Any
        ) -> Any:
            calls.append((_name, self.number))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Trial, method, recording)
    beat = WorkerApi.beat

    def beat_without_trial_0(self: WorkerApi, held: Any, *, status: str) -> Any:
        return beat(self, [ref for ref in held if ref[1] != 0], status=status)

    monkeypatch.setattr(WorkerApi, "beat", beat_without_trial_0)
    should_prune = Slot.should_prune

    def slow_first_epoch_of_trial_0(self: Slot, trial: Trial, step: int, value: float) -> bool:
        if trial.number == 0 and not retry:
            wait_until(lambda: trials.get_trial(db, "lease", 0).state == "fail", 20, "trial 0 was not reaped")
            asked = httpx.post(f"{api}/trials/ask", json={"worker_id": "new-owner"}, timeout=30)
            assert asked.status_code == 200, asked.text
            retry.update(asked.json())
            keeper.start()  # the new owner keeps its lease
        answer = should_prune(self, trial, step, value)
        if trial.number == 0:
            answers.append(answer)
        return answer

    import threading

    done = threading.Event()

    def keep_the_retry() -> None:
        while not done.wait(0.2):
            httpx.post(
                f"{api}/trials/{retry['number']}/heartbeat", json={"worker_id": "new-owner"}, timeout=30
            )

    keeper = threading.Thread(target=keep_the_retry, daemon=True)

    monkeypatch.setattr(Slot, "should_prune", slow_first_epoch_of_trial_0)
    try:
        run_slot_in_thread(live, 120)
    finally:
        done.set()
    assert retry["number"] != 0
    reaped = trials.get_trial(db, "lease", 0)
    assert reaped.state == "fail" and "lease expired" in (reaped.fail_reason or ""), reaped.fail_reason
    # one report (answered lease_lost), then nothing: training of trial 0 stopped, no result told
    assert [c for c in calls if c[1] == 0] == [("report", 0)], calls
    assert not [c for c in calls if c[1] == retry["number"]], calls
    assert answers == [True]  # stopped at that report, not an epoch later
    taken = trials.get_trial(db, "lease", retry["number"])
    assert (taken.state, taken.retry_of, taken.worker_id) == ("running", 0, "new-owner")
    told = httpx.post(
        f"{api}/trials/{retry['number']}/tell",
        json={"state": "complete", "value": 0.5, "worker_id": "new-owner"},
        timeout=30,
    )
    assert told.status_code == 200, told.text
    assert trials.get_trial(db, "lease", retry["number"]).value == 0.5
    others = [
        t for t in trials.list_trials(db, "lease", limit=100).items if t.number not in (0, retry["number"])
    ]
    assert [t.state for t in others] == ["complete"]  # the slot went on with the study's other trial


def test_max_trials_stops_the_worker_after_n(
    db: Database, serve: Callable[..., Service], spawn: Callable[..., CaviarProcess]
) -> None:
    """`caviar worker --max-trials 2` (no --exit-when-idle) exits 0 after finishing 2 trials of a
    6-trial study, leaving the other 4 to other workers."""
    service = serve()
    body = digits_study("maxn", n_trials=6, max_epochs=2)
    body["sampler"] = {"type": "random", "seed": 0}
    body["pruner"] = {"type": "none"}
    store.create_study(db, store.parse_definition(body))
    workers = spawn(service, "--cpu", "1", "--study", "maxn", "--max-trials", "2")
    assert workers.wait(90) == 0, workers.output()
    counts = finished_counts(db, "maxn")
    assert counts["complete"] == 2 and counts["running"] == 0 and counts["waiting"] == 0, counts
    assert store.load_record(db, "maxn").state == "running"  # the rest is left for others


def test_a_crashed_slot_is_restarted_and_finishes_the_study(
    db: Database, serve: Callable[..., Service], spawn: Callable[..., CaviarProcess]
) -> None:
    """The only slot of `caviar worker --cpu 1` is killed mid-trial: the supervisor starts a new slot
    process (a new pid registers), which runs the reaped trial's retry and the rest of the study."""
    # leases of 2 s: short enough to reap the killed slot's trial at once, long enough that a
    # loaded machine (CI runs two test processes) does not reap the live slot's trials too
    service = serve(heartbeat=1.0)
    body = digits_study("crash", n_trials=3, max_epochs=3)
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


def test_demo_runs_end_to_end(db_url: str, tmp_path: Path) -> None:
    """`caviar demo` with a small budget: serves, trains on CPU workers, completes the study and
    prints the best trial and where to look next; exit 0."""
    from caviar.service.processes import free_port

    demo = CaviarProcess(
        ["demo", "--n-trials", "2", "--workers", "1", "--fuse", "1", "--port", str(free_port(23000))],
        env={"CAVIAR_DATABASE_URL": db_url, "CAVIAR_ARTIFACT_DIR": str(tmp_path / "artifacts")},
        unset=("CAVIAR_API_TOKEN",),
        log=tmp_path / "demo-output.log",
        cwd=tmp_path,
    )
    try:
        assert demo.wait(150) == 0, demo.output()
    finally:
        demo.stop()
    output = " ".join(demo.output(20000).split())
    assert "study digits-mlp completed" in output, output
    assert "best trial #" in output and "val_accuracy" in output and "/dashboard" in output
    db = Database(db_url)
    try:
        study = studies.describe(db, store.load_record(db, "digits-mlp"))
    finally:
        db.dispose()
    counts = study.trial_counts
    assert study.state == "completed" and counts.complete + counts.pruned == 2, counts
    assert (tmp_path / "caviar-demo.log").exists()  # the API's and workers' log, next to the user
