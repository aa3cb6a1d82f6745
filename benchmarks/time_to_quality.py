"""Benchmark: time to quality, caviar workers vs plain Optuna + a tight PyTorch loop.

The same tuning task runs in two arms, one after the other, per seed (the order alternates):

* ``caviar``: the study is created through the domain code (``create_study``) on a freshly
  migrated database, then ``caviar worker --gpus none --cpu SLOTS --fuse K`` trains it over REST
  against ``caviar serve``: one process per core (one torch thread each), fused groups of up to K
  trials (the sampler's start-up trials run unfused, so early results come back one by one; a
  pruned member's place in a group is taken by a new trial), TPE, the chosen pruner every epoch.
* ``plain`` (the baseline a rival would accept): ``optuna.create_study`` on the same kind of
  database, then SLOTS processes (one per core, ``torch.set_num_threads(1)``) each running
  ``study.optimize(n_trials=its share)`` (the shares add up to exactly ``n_trials``) over
  ``benchmarks.baseline.train_plain(feed="tensor")``: ``nn.Sequential`` + ``torch.optim.Adam`` on
  pre-loaded tensors, one ``randperm`` per epoch, slicing, one validation forward per epoch,
  ``trial.report`` + ``trial.should_prune`` every epoch; TPE (Optuna's defaults, as caviar's
  ``{type: tpe}``) and the same pruner, built directly with Optuna.

Task, chosen so that hyperparameters matter (the first trials of a search land far from its final
best): ``make_classification`` with 20,000 rows x 60 features (20 informative, 10 redundant), 8
classes of 4 clusters each, ``class_sep`` 0.8, 2% flipped labels (``TASK``), written once as an
``.npz`` both arms load (80/20 stratified split). An MLP 2 x 128 ReLU, batch 256, Adam, 15
epochs. Search space, identical in both arms: lr log-uniform 1e-5..1, beta1 with 1 - beta1
log-uniform (caviar's ``reverse_log``) over 0.5..0.999, dropout uniform 0..0.6, weight decay
log-uniform 1e-6..1e-1. Pruner (``--pruner``, the same in both arms): ``asha`` (Optuna's
SuccessiveHalvingPruner, min_resource 1, reduction factor 3; the default), ``hyperband``,
``median`` or ``none``.

Clocks: ``t0`` is taken right before the arm's processes are spawned, so both arms' times include
process start-up (interpreter + torch import + data); database and study creation come before
``t0`` in both arms. A trial counts when Optuna records its completion (``datetime_complete``);
the best-so-far curve uses complete trials only (as Optuna's best does).

What it reports, per seed (one JSON line per arm and a ``comparison`` line) and as medians over
seeds with min and max (the last, ``summary``, line):

* the bar: the plain loop's final best, and how far its early trials were from it (the value of
  its first complete trial, and the median of the first ``GAP_TRIALS`` finished trials, pruned
  ones at their last reported value);
* time to the plain loop's final best in both arms (``null``: never reached) and the speedup;
  the same for that value minus ``--epsilon``;
* best value at equal wall time: each arm's best at the moment the plain loop reached its final
  best, and at 25%, 50% and 100% of the plain loop's wall time;
* wall time, start-up, epochs trained, pruned trials.

Two modes (``--mode``; ``both``, the default, runs each per seed and prints a summary line for each):

* ``defaults``: what each side gets by naming nothing. caviar: a definition with no sampler and no
  pruner (the ``auto`` sampler, the ``asha`` pruner with its in-group rung ranking, budget defaults
  but ``n_trials``) and ``caviar worker --fuse K``; plain Optuna: ``TPESampler()`` and
  ``MedianPruner()`` with their default options.
* ``same``: the same sampler (TPE) and pruner (``--pruner``) in both arms, as described above.

Usage: ``python benchmarks/time_to_quality.py [--mode both|defaults|same] [--seeds 3]
[--n-trials 60] [--fuse 8] [--pruner asha|hyperband|median|none] [--quick] [--storage postgres|sqlite]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` from a checkout
    sys.path.insert(0, str(ROOT))

from caviar.service import processes  # noqa: E402

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DATA_FILE = "ttq.npz"  # written by make_task() into the run's data root (CAVIAR_DATA_DIR)
VALIDATION_SPLIT = 0.2
LAYERS, HIDDEN, BATCH = 2, 128, 256
LR = (1e-5, 1.0)
BETA1 = (0.5, 0.999)
DROPOUT = (0.0, 0.6)
WEIGHT_DECAY = (1e-6, 1e-1)
# make_classification: overlapping classes made of several clusters each, many noise features
TASK = {
    "n_samples": 20_000,
    "n_features": 60,
    "n_informative": 20,
    "n_redundant": 10,
    "n_classes": 8,
    "n_clusters_per_class": 4,
    "class_sep": 0.8,
    "flip_y": 0.02,
    "random_state": 0,
}
QUICK_TASK = {**TASK, "n_samples": 6_000}


def make_task(folder: Path, quick: bool) -> Path:
    """Write the task's data set (X, y) as ``folder / DATA_FILE``; both arms load this file."""
    import numpy as np
    from sklearn.datasets import make_classification

    x, y = make_classification(**(QUICK_TASK if quick else TASK))
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / DATA_FILE, X=x.astype(np.float32), y=y)
    return folder / DATA_FILE


def pruner_spec(kind: str, max_epochs: int) -> dict[str, Any]:
    """The pruner both arms use, as a caviar definition (the plain arm builds the same object)."""
    if kind == "asha":
        return {"type": "successive_halving", "options": {"min_resource": 1, "reduction_factor": 3}}
    if kind == "hyperband":
        return {
            "type": "hyperband",
            "options": {"min_resource": 1, "max_resource": max_epochs, "reduction_factor": 3},
        }
    if kind == "median":
        return {"type": "median", "options": {"n_startup_trials": 5, "n_warmup_steps": 1}}
    return {"type": "none"}


def plain_pruner(kind: str, max_epochs: int) -> Any:
    """The same pruner, built directly with Optuna, for the plain arm (``default``: Optuna's
    ``MedianPruner()`` with its default options, what ``optuna.create_study()`` uses)."""
    import optuna

    if kind == "default":
        return optuna.pruners.MedianPruner()
    if kind == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs, reduction_factor=3)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


GAP_TRIALS = 10  # the plain loop's first trials (TPE's start-up: random draws) against its final best


# ---- storage -------------------------------------------------------------------------------


@contextmanager
def database(backend: str, tmp: Path, label: str) -> Iterator[str]:
    """A fresh, empty database URL (a PostgreSQL database or an SQLite file), removed afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp / (label + '.db')}"
        return
    from sqlalchemy import create_engine, text

    name = f"caviar_ttq_{label}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def postgres_available() -> bool:
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


# ---- the caviar arm ------------------------------------------------------------------------


def caviar_definition(
    name: str, seed: int, n_trials: int, max_epochs: int, fuse: int, pruner: str, defaults: bool = False
) -> dict[str, Any]:
    """The study; with ``defaults`` no sampler, pruner or budget but ``n_trials`` is named (the
    sampler's seed aside, which chooses no algorithm) and the fused size comes from the worker."""
    definition = _definition(name, seed, n_trials, max_epochs, fuse, pruner)
    if defaults:
        definition["sampler"] = {"seed": seed}
        del definition["pruner"]
        del definition["objective"]["fuse"]
        definition["budget"] = {"n_trials": n_trials}
    return definition


def _definition(
    name: str, seed: int, n_trials: int, max_epochs: int, fuse: int, pruner: str
) -> dict[str, Any]:
    return {
        "name": name,
        "direction": "maximize",
        "metric": "val_accuracy",
        "search_space": {
            "lr": {"type": "float", "low": LR[0], "high": LR[1], "scale": "log"},
            "beta1": {"type": "float", "low": BETA1[0], "high": BETA1[1], "scale": "reverse_log"},
            "dropout": {"type": "float", "low": DROPOUT[0], "high": DROPOUT[1]},
            "weight_decay": {
                "type": "float",
                "low": WEIGHT_DECAY[0],
                "high": WEIGHT_DECAY[1],
                "scale": "log",
            },
        },
        "objective": {
            "kind": "trainer",
            "dataset": f"file:{DATA_FILE}",
            "validation_split": VALIDATION_SPLIT,
            "model": "mlp",
            "max_epochs": max_epochs,
            # xavier: the closest of the trainer's inits to nn.Linear's default used by the plain arm
            "fixed": {
                "layers": LAYERS,
                "hidden_units": HIDDEN,
                "batch_size": BATCH,
                "optimizer": "adam",
                "init": "xavier",
            },
            "fuse": fuse,
        },
        "sampler": {"type": "tpe", "seed": seed},
        "pruner": pruner_spec(pruner, max_epochs),
        "budget": {
            "n_trials": n_trials,
            "max_parallel": n_trials,
            "max_retries": 0,
            "max_failed_trials": n_trials,
        },
    }


def run_caviar(url: str, tmp: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from caviar import storage
    from caviar.service.db import Database
    from caviar.service.store import create_study, parse_definition

    storage.upgrade(url)
    db = Database(url)
    name = f"ttq-caviar-{args.mode}-{seed}"
    definition = caviar_definition(
        name, seed, args.n_trials, args.max_epochs, args.fuse, args.pruner, defaults=args.mode == "defaults"
    )
    parsed = parse_definition(definition)
    create_study(db, parsed)
    db.dispose()
    env = {"CAVIAR_ARTIFACT_DIR": str(tmp / f"artifacts-{seed}"), "CAVIAR_DATA_DIR": str(tmp / "data")}
    server, base = processes.serve(url, env=env, log=tmp / f"serve-{args.mode}-{seed}.log")
    command = ["worker", "--url", base, "--gpus", "none", "--cpu", str(args.slots), "--study", name]
    command += ["--fuse", str(args.fuse), "--exit-when-idle", "0.5", "--poll-interval", "0.2"]
    with server:
        t0 = time.time()
        worker = processes.CaviarProcess(
            command, env=env, log=tmp / f"caviar-{args.mode}-{seed}.log", cwd=tmp
        )
        code = worker.wait(timeout=args.timeout)
        exited = time.time() - t0
    if code != 0:
        raise RuntimeError(f"caviar worker exited {code}: {worker.output(3000)}")
    arm = analyse(url, name, t0)
    arm["processes_exited_s"] = exited
    arm["sampler"] = parsed.sampler_description()
    arm["pruner"] = parsed.pruner.model_dump(mode="json")
    return arm


# ---- the plain arm -------------------------------------------------------------------------


def plain_worker(url: str, name: str, n_trials: int, seed: int, index: int) -> None:
    """One process of the plain arm: ``study.optimize`` over a tight PyTorch loop on tensors."""
    import optuna
    import torch

    from benchmarks.baseline import train_plain
    from caviar.trainer import TrialConfig, load_dataset

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = load_dataset(os.environ["TTQ_DATA"], VALIDATION_SPLIT, seed=0)
    max_epochs = int(os.environ["TTQ_MAX_EPOCHS"])

    def objective(trial: optuna.Trial) -> float:
        config = TrialConfig(
            layers=LAYERS,
            hidden_units=HIDDEN,
            batch_size=BATCH,
            optimizer="adam",
            init="xavier",
            max_epochs=max_epochs,
            lr=trial.suggest_float("lr", *LR, log=True),
            beta1=1.0 - trial.suggest_float("one_minus_beta1", 1.0 - BETA1[1], 1.0 - BETA1[0], log=True),
            dropout=trial.suggest_float("dropout", *DROPOUT),
            weight_decay=trial.suggest_float("weight_decay", *WEIGHT_DECAY, log=True),
            seed=trial.number,
        )

        def report(epoch: int, value: float) -> bool:
            trial.report(value, epoch)
            return trial.should_prune()

        result = train_plain(config, data, report, feed="tensor")
        if result.pruned:
            raise optuna.TrialPruned()
        return result.metrics["val_accuracy"]

    study = optuna.load_study(
        study_name=name,
        storage=url,
        sampler=optuna.samplers.TPESampler(seed=seed * 1000 + index),
        pruner=plain_pruner(os.environ["TTQ_PRUNER"], max_epochs),
    )
    # exact budget: process i runs its share of n_trials (what one writes with n_trials per process)
    slots = int(os.environ["TTQ_SLOTS"])
    study.optimize(objective, n_trials=n_trials // slots + (index < n_trials % slots))


def run_plain(url: str, tmp: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"ttq-plain-{args.mode}-{seed}"
    optuna.create_study(study_name=name, storage=url, direction="maximize")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TTQ_MAX_EPOCHS": str(args.max_epochs),
        "TTQ_DATA": str(tmp / "data" / DATA_FILE),
        "TTQ_PRUNER": "default" if args.mode == "defaults" else args.pruner,
        "TTQ_SLOTS": str(args.slots),
    }
    logs = [open(tmp / f"plain-{args.mode}-{seed}-{i}.log", "wb") for i in range(args.slots)]  # noqa: SIM115
    try:
        t0 = time.time()
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--plain-worker",
                    url,
                    name,
                    str(args.n_trials),
                    str(seed),
                    str(i),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp,
            )
            for i, log in enumerate(logs)
        ]
        codes = [p.wait(timeout=args.timeout) for p in processes]
        exited = time.time() - t0
    finally:
        for log in logs:
            log.close()
    if any(codes):
        raise RuntimeError(f"plain worker exited {codes}: {Path(logs[0].name).read_text()[-3000:]}")
    arm = analyse(url, name, t0)
    arm["processes_exited_s"] = exited
    arm["sampler"] = {"type": "tpe", "options": "Optuna's defaults", "seed": f"{seed} * 1000 + process"}
    arm["pruner"] = repr(plain_pruner(env["TTQ_PRUNER"], args.max_epochs).__class__.__name__)
    return arm


# ---- analysis ------------------------------------------------------------------------------


@dataclass
class Curve:
    """Best-so-far of complete trials over wall time since t0."""

    times: list[float]  # completion times of the complete trials, ascending
    bests: list[float]  # running best at each of those times
    values: list[float]  # each complete trial's own value, in completion order

    def time_to(self, target: float) -> float | None:
        for t, best in zip(self.times, self.bests, strict=True):
            if best >= target:
                return t
        return None

    def best_at(self, budget: float) -> float | None:
        best = None
        for t, value in zip(self.times, self.bests, strict=True):
            if t <= budget:
                best = value
        return best


def analyse(url: str, name: str, t0: float) -> dict[str, Any]:
    """Read the finished study back from storage: curve, epochs, start-up and totals."""
    import optuna
    from optuna.trial import TrialState

    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    finished = [t for t in trials if t.datetime_complete is not None]
    complete = sorted(
        (t for t in finished if t.state == TrialState.COMPLETE),
        key=lambda t: t.datetime_complete,  # type: ignore[arg-type,return-value]
    )
    times, bests, values, best = [], [], [], -math.inf
    for trial in complete:
        assert trial.datetime_complete is not None and trial.value is not None
        best = max(best, trial.value)
        times.append(trial.datetime_complete.timestamp() - t0)
        bests.append(best)
        values.append(trial.value)
    by_finish = sorted(finished, key=lambda t: t.datetime_complete)  # type: ignore[arg-type,return-value]
    early = [t.value for t in by_finish[:GAP_TRIALS] if t.value is not None]
    starts = [t.datetime_start.timestamp() - t0 for t in trials if t.datetime_start is not None]
    ends = [t.datetime_complete.timestamp() - t0 for t in finished]  # type: ignore[union-attr]
    timeline = [
        {
            "number": t.number,
            "state": t.state.name.lower(),
            "start_s": None if t.datetime_start is None else round(t.datetime_start.timestamp() - t0, 2),
            "end_s": None if t.datetime_complete is None else round(t.datetime_complete.timestamp() - t0, 2),
            "epochs": len(t.intermediate_values),
            "value": None if t.value is None else round(t.value, 4),
        }
        for t in trials
    ]
    return {
        "_curve": Curve(times, bests, values),
        "_timeline": timeline,
        "n_trials": len(trials),
        "complete": len(complete),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "epochs": sum(len(t.intermediate_values) for t in trials),
        "startup_s": min(starts) if starts else None,  # spawn + imports + data until the first trial
        "wall_s": max(ends) if ends else None,  # until the last trial finished
        "final_best": bests[-1] if bests else None,
        "first_trials_median_value": statistics.median(early) if early else None,
    }


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def ratio(plain: float | None, caviar: float | None) -> float | None:
    if plain is None or caviar is None or caviar <= 0:
        return None
    return round(plain / caviar, 2)


FRACTIONS = (0.25, 0.5, 1.0)  # equal wall-time budgets, as fractions of the plain arm's wall time


def compare(seed: int, arms: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One line per arm plus a comparison line for one seed."""
    if None in (arms["caviar"]["final_best"], arms["plain"]["final_best"]):
        raise RuntimeError(f"seed {seed}: an arm completed no trial (all pruned or failed); raise --n-trials")
    plain_curve: Curve = arms["plain"]["_curve"]
    plain_final = arms["plain"]["final_best"]
    target = plain_final  # the plain loop's final best: the bar
    loose = plain_final - args.epsilon
    plain_wall = arms["plain"]["wall_s"]
    lines: list[dict[str, Any]] = []
    derived: dict[str, dict[str, Any]] = {}
    for arm_name, arm in arms.items():
        curve: Curve = arm["_curve"]
        derived[arm_name] = {
            "time_to_plain_final_best_s": curve.time_to(target),
            "time_to_plain_final_best_minus_eps_s": curve.time_to(loose),
            "best_at_plain_time_to_final_best": curve.best_at(plain_curve.time_to(target) or 0.0),
            **{f"best_at_{f:g}_plain_wall": curve.best_at(f * plain_wall) for f in FRACTIONS},
        }
        line = {
            "mode": args.mode,
            "seed": seed,
            "arm": arm_name,
            "plain_final_best": round(target, 4),
            **{k: rounded(v, 3 if k.startswith("time") else 4) for k, v in derived[arm_name].items()},
            "first_complete_value": rounded(curve.values[0] if curve.values else None, 4),
            "best_of_first_slots_complete": rounded(max(curve.values[: args.slots], default=None), 4),
            "first_trials_median_value": rounded(arm["first_trials_median_value"], 4),
            "final_best": rounded(arm["final_best"], 4),
            "wall_s": rounded(arm["wall_s"]),
            "startup_s": rounded(arm["startup_s"]),
            "processes_exited_s": rounded(arm["processes_exited_s"]),
            "epochs_trained": arm["epochs"],
            "n_trials": arm["n_trials"],
            "complete": arm["complete"],
            "pruned": arm["pruned"],
            "failed": arm["failed"],
            "sampler": arm.get("sampler"),
            "pruner": arm.get("pruner"),
        }
        if args.timeline:
            line["timeline"] = arm["_timeline"]
        lines.append(line)
    c, p = derived["caviar"], derived["plain"]
    plain_line = lines[[a for a in arms].index("plain")]
    lines.append(
        {
            "mode": args.mode,
            "seed": seed,
            "arm": "comparison",
            "plain_final_best": round(target, 4),
            # how far the plain loop's first results were from its final best: the task needs search
            "plain_gap_first_to_final": rounded(target - plain_line["first_complete_value"], 4),
            "plain_gap_first_slots_to_final": rounded(target - plain_line["best_of_first_slots_complete"], 4),
            "plain_gap_first_trials_median_to_final": (
                None
                if plain_line["first_trials_median_value"] is None
                else round(target - plain_line["first_trials_median_value"], 4)
            ),
            "speedup_to_plain_final_best": ratio(
                p["time_to_plain_final_best_s"], c["time_to_plain_final_best_s"]
            ),
            "speedup_to_plain_final_best_minus_eps": ratio(
                p["time_to_plain_final_best_minus_eps_s"], c["time_to_plain_final_best_minus_eps_s"]
            ),
            "caviar_minus_plain_best_at_plain_time_to_final_best": (
                None
                if c["best_at_plain_time_to_final_best"] is None
                else round(c["best_at_plain_time_to_final_best"] - target, 4)
            ),
            **{
                f"caviar_minus_plain_best_at_{f:g}_plain_wall": (
                    None
                    if c[f"best_at_{f:g}_plain_wall"] is None or p[f"best_at_{f:g}_plain_wall"] is None
                    else round(c[f"best_at_{f:g}_plain_wall"] - p[f"best_at_{f:g}_plain_wall"], 4)
                )
                for f in FRACTIONS
            },
            "speedup_wall": ratio(arms["plain"]["wall_s"], arms["caviar"]["wall_s"]),
            "epochs_ratio_caviar_over_plain": ratio(arms["caviar"]["epochs"], arms["plain"]["epochs"]),
            "final_best_delta_caviar_minus_plain": round(
                arms["caviar"]["final_best"] - arms["plain"]["final_best"], 4
            ),
        }
    )
    return lines


def spread(values: Sequence[float | None], missing_as: float | None = None) -> dict[str, Any] | None:
    """Median, min and max over seeds, with how many seeds never reached the value (``None``).

    ``missing_as`` stands in for a missing value (``inf`` for a time never reached, 0 for its
    speedup), so that a seed that missed counts against the median instead of dropping out; a
    median that lands on ``inf`` is ``None``. Without it missing values are left out.
    """
    present = [v for v in (missing_as if v is None else v for v in values) if v is not None]
    if not present:
        return None

    def finite(value: float) -> float | None:
        return round(value, 4) if math.isfinite(value) else None

    return {
        "median": finite(statistics.median(present)),
        "min": finite(min(present)),
        "max": finite(max(present)),
        "missing": sum(v is None for v in values),
    }


def summary(lines: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    def of(arm: str, key: str) -> dict[str, Any] | None:
        missing_as = math.inf if key.startswith("time_to") else 0.0 if key.startswith("speedup_to") else None
        return spread([line[key] for line in lines if line["arm"] == arm], missing_as)

    task = QUICK_TASK if args.quick else TASK
    defaults = args.mode == "defaults"
    out: dict[str, Any] = {
        "mode": args.mode,
        "arm": "summary",
        "seeds": args.seeds,
        "storage": args.storage,
        "task": (
            f"make_classification {task['n_samples']}x{task['n_features']}, {task['n_classes']} classes x "
            f"{task['n_clusters_per_class']} clusters, class_sep {task['class_sep']}; MLP {LAYERS}x{HIDDEN}, "
            f"batch {BATCH}, adam; lr {LR[0]:g}..{LR[1]:g} log; {args.n_trials} trials, "
            f"{args.max_epochs} epochs"
        ),
        "sampler": (
            "caviar: auto (named nothing); plain: TPESampler() (Optuna's defaults)"
            if defaults
            else "TPE (Optuna defaults) in both arms"
        ),
        "pruner": (
            "caviar: asha (named nothing: in-group rung ranking + SuccessiveHalvingPruner, eta 3); "
            "plain: MedianPruner() (Optuna's defaults)"
            if defaults
            else f"{args.pruner} in both arms: {pruner_spec(args.pruner, args.max_epochs)}"
        ),
        "slots": args.slots,
        "torch_threads_per_process": 1,
        "fuse": args.fuse,
        "plain_feed": "tensor (randperm + slicing, no DataLoader)",
        "note": (
            "medians over seeds with min/max; 'missing' counts seeds where a value was never reached: "
            "such a seed counts as an infinite time and a speedup of 0 (null where the median is infinite)"
        ),
    }
    for arm in ("caviar", "plain"):
        for key in (
            "time_to_plain_final_best_s",
            "time_to_plain_final_best_minus_eps_s",
            "best_at_plain_time_to_final_best",
            *(f"best_at_{f:g}_plain_wall" for f in FRACTIONS),
            "first_complete_value",
            "first_trials_median_value",
            "final_best",
            "wall_s",
            "startup_s",
            "epochs_trained",
            "pruned",
        ):
            out[f"{arm}_{key}"] = of(arm, key)
    for key in (
        "plain_gap_first_to_final",
        "plain_gap_first_slots_to_final",
        "plain_gap_first_trials_median_to_final",
        "speedup_to_plain_final_best",
        "speedup_to_plain_final_best_minus_eps",
        "caviar_minus_plain_best_at_plain_time_to_final_best",
        *(f"caviar_minus_plain_best_at_{f:g}_plain_wall" for f in FRACTIONS),
        "speedup_wall",
        "epochs_ratio_caviar_over_plain",
        "final_best_delta_caviar_minus_plain",
    ):
        out[key] = of("comparison", key)
    return out


# ---- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run both arms for every seed and print JSON lines."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--plain-worker":
        url, name, n_trials, worker_seed, index = argv[1:6]
        plain_worker(url, name, int(n_trials), int(worker_seed), int(index))
        return
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds, each one caviar + one plain run (3; quick 1)"
    )
    parser.add_argument("--n-trials", type=int, default=None, help="trials per run (60; quick 12)")
    parser.add_argument("--max-epochs", type=int, default=None, help="epochs per trial (15; quick 4)")
    parser.add_argument("--fuse", type=int, default=None, help="fused group size (default 8; quick 4)")
    parser.add_argument("--pruner", choices=("asha", "hyperband", "median", "none"), default="asha")
    parser.add_argument(
        "--mode",
        choices=("both", "defaults", "same"),
        default="both",
        help="defaults: each side's defaults; same: TPE and --pruner in both arms; both (default)",
    )
    parser.add_argument("--slots", type=int, default=2, help="processes per arm, one per core (2)")
    parser.add_argument("--storage", choices=("postgres", "sqlite", "auto"), default="auto")
    parser.add_argument("--epsilon", type=float, default=0.005, help="loose target = plain final best - this")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per arm before giving up")
    parser.add_argument("--timeline", action="store_true", help="add every trial's start/end to arm lines")
    parser.add_argument(
        "--quick", action="store_true", help="6,000 rows; unless given: 1 seed, 12 trials, 4 epochs, fuse 4"
    )
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.n_trials = args.n_trials or (12 if args.quick else 60)
    args.max_epochs = args.max_epochs or (4 if args.quick else 15)
    args.fuse = args.fuse or (4 if args.quick else 8)
    if args.storage == "auto":
        args.storage = "postgres" if postgres_available() else "sqlite"
    tmp = Path(tempfile.mkdtemp(prefix="caviar-ttq-"))
    modes = ("defaults", "same") if args.mode == "both" else (args.mode,)
    lines: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    try:
        make_task(tmp / "data", args.quick)
        for seed in range(args.seeds):
            for mode in modes:
                run_args = argparse.Namespace(**{**vars(args), "mode": mode})
                arms: dict[str, dict[str, Any]] = {}
                order = ("caviar", "plain") if seed % 2 == 0 else ("plain", "caviar")  # alternate for drift
                for arm_name in order:
                    with database(args.storage, tmp, f"{arm_name}{mode}{seed}") as url:
                        runner = run_caviar if arm_name == "caviar" else run_plain
                        arms[arm_name] = runner(url, tmp, seed, run_args)
                for line in compare(seed, arms, run_args):
                    print(json.dumps(line), flush=True)
                    lines[mode].append(line)
        for mode in modes:
            print(
                json.dumps(summary(lines[mode], argparse.Namespace(**{**vars(args), "mode": mode}))),
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
