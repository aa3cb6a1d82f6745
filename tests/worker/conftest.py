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
