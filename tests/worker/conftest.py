"""The end-to-end worker tests' shared parts: a real ``caviar serve`` on the test database, real
``caviar worker`` processes against it (no database URL in their environment), the example study
kept small, and views of the study through the domain functions.

The tests are spread over several modules (``test_worker.py``, ``test_worker_faults.py``,
``test_worker_slot.py``) so that pytest-xdist, which keeps a module on one process, can run
them side by side.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from caviar.service import processes, store
from caviar.service.db import Database
from caviar.service.examples import example_path
from caviar.service.processes import CaviarProcess
from caviar.service.studies import service as studies
from caviar.storage import WorkerRecord


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
