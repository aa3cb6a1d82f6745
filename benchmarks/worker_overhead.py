"""Benchmark: a caviar worker's per-trial overhead vs plain Optuna and the old direct-DB worker.

Every arm runs the same small study on the digits MLP: trials made so small that training is a
minor part of each (1 epoch, fuse 1, no pruning), the architecture, batch size and optimizer fixed
(``FIXED``) so that every trial costs the same training whatever the sampler draws (lr, beta1,
dropout: TPE, seed 0), one process, on the same kind of freshly migrated database:

* ``rest`` (today): ``caviar serve`` + ``caviar worker --cpu 1 --url ...``; every ask, report,
  heartbeat, checkpoint upload and tell is an HTTP call to the API.
* ``plain_optuna`` (the baseline a rival would accept): one process running ``study.optimize`` on
  the same database (RDBStorage, TPE seed 0, the same three parameters), whose objective calls
  the same ``caviar.trainer.train`` on pre-loaded data with ``trial.report`` every epoch: the
  plumbing differs, the training is the same, so the difference of time per trial is the
  difference of per-trial overhead. It uses as many torch threads as the worker's one slot does
  (all cores). Its line also gives the seconds spent inside training, and so Optuna's own
  per-trial overhead.
* ``direct_db`` (history): the worker of commit ``--baseline-ref`` (the last one whose worker
  opened the database itself), materialised from git into a temporary folder.

Time per trial: wall time from the first trial's start to the last trial's end (Optuna's
timestamps), divided by the trials; start-up is excluded in every arm. The arms' order rotates
from one repeat to the next; the summary gives medians over ``--repeat`` runs with min and max.
Prints one JSON line per run and a summary.

    python benchmarks/worker_overhead.py [--trials 40] [--repeat 3] [--storage postgres|sqlite]
        [--arms rest,plain_optuna,direct_db]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` from a checkout
    sys.path.insert(0, str(ROOT))

from caviar import storage  # noqa: E402
from caviar.service import processes, store  # noqa: E402
from caviar.service.db import Database  # noqa: E402
from caviar.service.examples import example_path  # noqa: E402

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BASELINE_REF = "a460f04"  # the last commit whose worker opened the database directly


FIXED = {"layers": 2, "hidden_units": 128, "batch_size": 64, "optimizer": "adam"}
ARMS = ("rest", "plain_optuna", "direct_db")


def definition(name: str, n_trials: int) -> dict[str, Any]:
    body = yaml.safe_load(example_path("digits-mlp").read_text())
    body["name"] = name
    body["search_space"] = {k: v for k, v in body["search_space"].items() if k in ("lr", "beta1", "dropout")}
    body["objective"].update(max_epochs=1, fuse=1, fixed=FIXED)
    body["sampler"] = {"type": "tpe", "seed": 0}
    body["pruner"] = {"type": "none"}
    body["budget"] = {"n_trials": n_trials, "max_parallel": 4}
    return body


@contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp / (uuid.uuid4().hex[:8] + '.db')}"
        return
    from sqlalchemy import create_engine, text

    name = f"caviar_wo_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        storage.reset_optuna_storages()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def materialise(ref: str, target: Path) -> Path:
    """The tree of commit ``ref`` (its caviar package) in ``target``."""
    archive = target / "baseline.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), ref], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target / "baseline", filter="data")
    return target / "baseline"


WORKER_ARGS = ["--gpus", "none", "--cpu", "1", "--exit-when-idle", "1", "--poll-interval", "0.2"]


def run_rest(url: str, tmp: Path, name: str, timeout: float) -> None:
    server, base = processes.serve(
        url, env={"CAVIAR_ARTIFACT_DIR": str(tmp / "artifacts")}, log=tmp / "serve.log"
    )
    with server:
        worker = processes.CaviarProcess(
            ["worker", "--url", base, *WORKER_ARGS, "--study", name], log=tmp / "rest.log", cwd=tmp
        )
        if worker.wait(timeout) != 0:
            raise RuntimeError(worker.output())


def run_direct(url: str, tmp: Path, name: str, timeout: float, baseline: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(baseline),
        "CAVIAR_DATABASE_URL": url,
        "CAVIAR_ARTIFACT_DIR": str(tmp / "artifacts"),
    }
    with open(tmp / "direct.log", "wb") as log:
        process = subprocess.run(
            [sys.executable, "-m", "service.cli", "worker", *WORKER_ARGS, "--study", name],
            env=env,
            cwd=baseline,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if process.returncode != 0:
        raise RuntimeError((tmp / "direct.log").read_text()[-3000:])


PLAIN_OPTUNA = """
import json, os, sys, time
import optuna, torch
from caviar.trainer import TrialConfig, load_dataset, train
url, name, n_trials, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(os.cpu_count() or 1)  # what the worker's one CPU slot uses
optuna.logging.set_verbosity(optuna.logging.WARNING)
data = load_dataset("digits", 0.2, seed=0)
fixed = json.loads(sys.argv[5])
training = []

def objective(trial):
    params = {
        "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
        "beta1": 1 - trial.suggest_float("one_minus_beta1", 1 - 0.999, 1 - 0.8, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.6),
    }
    config = TrialConfig.from_params({**fixed, **params, "model": "mlp", "max_epochs": 1, "device": "cpu"})
    start = time.perf_counter()

    def report(step, value):
        trial.report(value, step)
        return trial.should_prune()

    result = train(config, data, report)
    training.append(time.perf_counter() - start)
    return result.metrics["val_accuracy"]

study = optuna.create_study(
    study_name=name, storage=url, direction="maximize", sampler=optuna.samplers.TPESampler(seed=0)
)
study.optimize(objective, n_trials=n_trials)
json.dump({"training_s": training}, open(out, "w"))
"""


CREATE_WITH_BASELINE = """
import json, sys
import storage
from service.db import Database
from service.studies.service import create_study, parse_definition
storage.upgrade(sys.argv[1])
create_study(Database(sys.argv[1]), parse_definition(json.loads(sys.argv[2])))
"""


def measure(arm: str, args: argparse.Namespace, baseline: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder, database(args.storage, Path(folder)) as url:
        tmp = Path(folder)
        name = f"overhead-{arm}"
        body = definition(name, args.trials)
        extra: dict[str, Any] = {}
        if arm == "rest":
            storage.upgrade(url)
            store.create_study(Database(url), store.parse_definition(body))
            run_rest(url, tmp, name, args.timeout)
        elif arm == "plain_optuna":
            storage.upgrade(url)  # the same migrated schema the other arms see
            out = tmp / "plain.json"
            command = [
                sys.executable,
                "-c",
                PLAIN_OPTUNA,
                url,
                name,
                str(args.trials),
                str(out),
                json.dumps(FIXED),
            ]
            subprocess.run(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp, check=True)
            training = json.loads(out.read_text())["training_s"]
            extra["training_ms_per_trial"] = round(1000 * sum(training) / len(training), 1)
        else:  # the baseline's own code creates what its worker reads
            command = [sys.executable, "-c", CREATE_WITH_BASELINE, url, json.dumps(body)]
            subprocess.run(command, env={**os.environ, "PYTHONPATH": str(baseline)}, cwd=baseline, check=True)
            run_direct(url, tmp, name, args.timeout, baseline)
        db = Database(url)
        import optuna

        trials = optuna.load_study(study_name=name, storage=db.optuna).get_trials(deepcopy=False)
        db.dispose()
    done = [t for t in trials if t.datetime_complete is not None and t.state.name == "COMPLETE"]
    if len(done) != args.trials:
        raise RuntimeError(f"{arm}: {len(done)} of {args.trials} trials completed")
    first = min(t.datetime_start for t in done if t.datetime_start is not None)
    last = max(t.datetime_complete for t in done if t.datetime_complete is not None)
    wall = (last - first).total_seconds()
    return {
        "arm": arm,
        "storage": args.storage,
        "trials": len(done),
        "wall_s": round(wall, 3),
        "ms_per_trial": round(1000 * wall / len(done), 1),
        "trials_per_s": round(len(done) / wall, 2),
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--storage", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms (default all)")
    parser.add_argument("--quick", action="store_true", help="10 trials, 1 repeat, SQLite")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.repeat, args.storage = 10, 1, "sqlite"
    arms = [a for a in args.arms.split(",") if a]
    if unknown := set(arms) - set(ARMS):
        parser.error(f"unknown arms: {', '.join(sorted(unknown))}")
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as folder:
        baseline = materialise(args.baseline_ref, Path(folder))
        for repeat in range(args.repeat):
            shift = repeat % len(arms)
            order = arms[shift:] + arms[:shift]  # each arm takes every position in turn
            for arm in order:
                result = measure(arm, args, baseline)
                runs[arm].append(result)
                print(json.dumps({"result": "run", "repeat": repeat, **result}), flush=True)
    summary: dict[str, Any] = {
        "result": "summary",
        "storage": args.storage,
        "trials": args.trials,
        "repeat": args.repeat,
    }
    for arm, results in runs.items():
        values = [r["ms_per_trial"] for r in results]
        summary[f"{arm}_ms_per_trial"] = {
            "median": round(statistics.median(values), 1),
            "min": min(values),
            "max": max(values),
        }
    if "plain_optuna" in runs:
        training = [r["training_ms_per_trial"] for r in runs["plain_optuna"]]
        summary["plain_optuna_training_ms_per_trial"] = round(statistics.median(training), 1)
        summary["plain_optuna_overhead_ms_per_trial"] = round(
            summary["plain_optuna_ms_per_trial"]["median"] - statistics.median(training), 1
        )
    for other in ("plain_optuna", "direct_db"):
        if "rest" in runs and other in runs:
            rest, base = (summary[f"{a}_ms_per_trial"]["median"] for a in ("rest", other))
            summary[f"rest_minus_{other}_ms_per_trial"] = round(rest - base, 1)
    summary["baseline_ref"] = args.baseline_ref
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
