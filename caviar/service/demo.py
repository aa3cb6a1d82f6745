"""``caviar demo``: the API, CPU/GPU workers and the example study, end to end, with live progress."""

from __future__ import annotations

import contextlib
import shutil
import time

import optuna
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from caviar import storage
from caviar.service import processes, store
from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.examples import example_path
from caviar.service.studies import service as studies
from caviar.service.studies.schemas import BestTrial

console = Console()


def _unique_name(db: Database, base: str) -> str:
    taken = {s.name for s in studies.list_studies(db, limit=100_000).items}
    if base not in taken:
        return base
    return next(f"{base}-{i}" for i in range(2, 100_000) if f"{base}-{i}" not in taken)


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
    optuna.logging.set_verbosity(optuna.logging.WARNING)
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
    record = store.create_study(db, store.parse_definition(definition))
    console.print(f"created study [bold]{name}[/]: digits MLP, TPE, Hyperband, {n_trials} trials")

    gpu = shutil.which("nvidia-smi") is not None
    devices = ["--gpus", "all"] if gpu else ["--gpus", "none", "--cpu", str(workers)]
    log = "caviar-demo.log"
    env = {"CAVIAR_ARTIFACT_DIR": settings.artifact_dir}
    server, base = processes.serve(url, port=processes.free_port(port), env=env, log=log)
    with server:
        console.print(f"API on {base} (docs: /docs); workers: {' '.join(devices[1:])}")
        worker_args = ["worker", "--url", base, *devices, "--study", name, "--exit-when-idle", "3"]
        with processes.CaviarProcess([*worker_args, "--poll-interval", "0.5"], log=log) as worker:
            _watch(db, record.name, n_trials, worker)
        study = studies.describe(db, store.load_record(db, name))
        _summary(study.model_dump(mode="json"), base, time.monotonic() - started)
        if keep_serving:
            console.print("serving until Ctrl-C")
            with contextlib.suppress(KeyboardInterrupt):
                server.process.wait()
    db.dispose()
    return 0 if study.state == "completed" else 1


def _watch(db: Database, name: str, n_trials: int, worker: processes.CaviarProcess) -> None:
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
            study = studies.describe(db, store.load_record(db, name))
            counts = study.trial_counts
            best = study.best
            best_text = f"best {best.value:.4f} (#{best.number})" if isinstance(best, BestTrial) else ""
            detail = f"running {counts.running}, pruned {counts.pruned}, failed {counts.fail}  {best_text}"
            progress.update(task, completed=counts.complete + counts.pruned, detail=detail)
            if study.state in ("completed", "failed", "stopped") or not worker.alive():
                return
            time.sleep(0.5)


def _summary(study: dict[str, object], base: str, seconds: float) -> None:
    best = study.get("best")
    counts = study["trial_counts"]
    console.print(f"\nstudy [bold]{study['name']}[/] {study['state']} in {seconds:.0f}s: {counts}")
    if isinstance(best, dict):
        console.print(f"best trial #{best['number']}: val_accuracy {best['value']:.4f}")
        for key, value in best["params"].items():
            console.print(f"  {key} = {value}")
    console.print(
        f"\ndashboard: {base}/dashboard   (run `caviar serve` to bring the API back after the demo)\n"
        f"API:       curl {base}/api/v1/studies/{study['name']}\n"
        f"           curl {base}/api/v1/studies/{study['name']}/best\n"
        f"CLI:       caviar study show {study['name']}; caviar study checkpoint {study['name']}"
    )
