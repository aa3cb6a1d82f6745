"""End-to-end tests of ``caviar worker``: real processes against a real ``caviar serve``.

Each test starts the API on the database under test and workers as the CLI does (``caviar worker
--url ...``, with no database URL in their environment), and watches the study through the
domain functions (fixtures in ``conftest.py``). Faults (signals, crashes, a database restart)
are in ``test_worker_faults.py``, one slot in this process in ``test_worker_slot.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from caviar.service import store, trials
from caviar.service.db import Database
from caviar.service.processes import CaviarProcess
from caviar.service.studies import service as studies
from caviar.worker import discover_slots
from tests.worker.conftest import Service, digits_study, finished_counts

pytestmark = pytest.mark.slow


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


@pytest.mark.one_database
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


@pytest.mark.one_database
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


@pytest.mark.one_database
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


@pytest.mark.one_database
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
