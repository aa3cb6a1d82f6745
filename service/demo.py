"""``caviar demo``: the API, CPU/GPU workers and the example study, end to end, with live progress."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import storage
from service.config import Settings
from service.db import Database
from service.examples import example_path
from service.studies import service as studies
from service.studies.schemas import BestTrial

console = Console()


def free_port(start: int) -> int:
    """The first port from ``start`` on which 127.0.0.1 can listen."""
    for port in range(start, start + 100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{start + 99}")


def _unique_name(db: Database, base: str) -> str:
    taken = {s.name for s in studies.list_studies(db, limit=100_000).items}
    if base not in taken:
        return base
    return next(f"{base}-{i}" for i in range(2, 100_000) if f"{base}-{i}" not in taken)


@contextlib.contextmanager
def _process(args: list[str], env: dict[str, str], log_path: str) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_healthy(port: int, server: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the API server exited during start-up (see caviar-demo.log)")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError("the API server did not become healthy in time (see caviar-demo.log)")


def run_demo(
    settings: Settings,
    *,
    port: int,
    n_trials: int | None,
    workers: int,
    fuse: int,
    keep_serving: bool = False,
) -> int:
    """Run the demo and return the exit status."""
    started = time.monotonic()
    url = settings.database_url
    console.print(f"[bold]caviar demo[/] on {url}")
    storage.upgrade(url)
    db = Database(url)
    definition = yaml.safe_load(example_path("digits-mlp").read_text())
    definition["name"] = _unique_name(db, definition["name"])
    if n_trials is not None:
        definition["budget"]["n_trials"] = n_trials
    n_trials = int(definition["budget"]["n_trials"])
    definition["budget"]["max_parallel"] = max(definition["budget"]["max_parallel"], workers * fuse)
    definition["objective"]["fuse"] = fuse
    name = definition["name"]
    record = studies.create_study(db, studies.parse_definition(definition))
    console.print(f"created study [bold]{name}[/]: digits MLP, TPE, Hyperband, {n_trials} trials")

    port = free_port(port)
    env = {**os.environ, "CAVIAR_DATABASE_URL": url, "CAVIAR_ARTIFACT_DIR": settings.artifact_dir}
    cli = [sys.executable, "-m", "service.cli"]
    gpu = shutil.which("nvidia-smi") is not None
    devices = ["--gpus", "all"] if gpu else ["--gpus", "none", "--cpu", str(workers)]
    log = "caviar-demo.log"
    server_args = [
        *cli,
        "serve",
        "--port",
        str(port),
        "--processes",
        "1",
        "--no-migrate",
        "--log-level",
        "warning",
    ]
    worker_args = [
        *cli,
        "worker",
        *devices,
        "--study",
        name,
        "--exit-when-idle",
        "3",
        "--poll-interval",
        "0.5",
    ]
    with _process(server_args, env, log) as server:
        _wait_healthy(port, server)
        console.print(f"API on http://127.0.0.1:{port} (docs: /docs); workers: {' '.join(devices[1:])}")
        with _process(worker_args, env, log) as worker:
            _watch(db, record.name, n_trials, worker)
        study = studies.describe(db, studies.load_record(db, name))
        _summary(study.model_dump(mode="json"), port, time.monotonic() - started)
        if keep_serving:
            console.print("serving until Ctrl-C")
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
    db.dispose()
    return 0 if study.state == "completed" else 1


def _watch(db: Database, name: str, n_trials: int, worker: subprocess.Popen[bytes]) -> None:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("trials", total=n_trials, detail="")
        while True:
            study = studies.describe(db, studies.load_record(db, name))
            counts = study.trial_counts
            best = study.best
            best_text = f"best {best.value:.4f} (#{best.number})" if isinstance(best, BestTrial) else ""
            detail = f"running {counts.running}, pruned {counts.pruned}, failed {counts.fail}  {best_text}"
            progress.update(task, completed=counts.complete + counts.pruned, detail=detail)
            if study.state in ("completed", "failed") or worker.poll() is not None:
                return
            time.sleep(0.5)


def _summary(study: dict[str, object], port: int, seconds: float) -> None:
    best = study.get("best")
    counts = study["trial_counts"]
    console.print(f"\nstudy [bold]{study['name']}[/] {study['state']} in {seconds:.0f}s: {counts}")
    if isinstance(best, dict):
        console.print(f"best trial #{best['number']}: val_accuracy {best['value']:.4f}")
        for key, value in best["params"].items():
            console.print(f"  {key} = {value}")
    base = f"http://127.0.0.1:{port}"
    console.print(
        f"\ndashboard: {base}/dashboard   (run `caviar serve` to bring the API back after the demo)\n"
        f"API:       curl {base}/api/v1/studies/{study['name']}\n"
        f"           curl {base}/api/v1/studies/{study['name']}/best\n"
        f"CLI:       caviar study show {study['name']}; caviar study checkpoint {study['name']}"
    )
