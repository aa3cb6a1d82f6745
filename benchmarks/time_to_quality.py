"""Benchmark: time to quality, caviar workers vs the plain Optuna + PyTorch loop.

The same tuning task (issue 5) runs in two arms, one after the other, per seed:

* ``caviar``: the study is created through the domain code (``create_study``) on a freshly
  migrated database, then ``caviar worker --gpus none --cpu SLOTS --fuse K`` trains it: one process
  per CPU slot, fused groups of up to K trials, TPE, Hyperband pruning on every epoch.
* ``plain``: what people write today: ``optuna.create_study`` on a shared storage, then
  SLOTS processes each running ``study.optimize`` with an objective in the style of Optuna's
  PyTorch example (``nn.Sequential`` MLP, ``torch.optim.Adam``, ``DataLoader`` over a
  ``TensorDataset``, ``trial.report`` + ``trial.should_prune`` every epoch), TPE + MedianPruner,
  ``MaxTrialsCallback`` capping the total number of trials.

Task: an MLP (2 hidden layers x 128 ReLU, dropout, batch size 256, Adam) on the trainer's
synthetic classification set (20000 x 40, 10 classes, 80/20 stratified split, data seed 0), the
same ``n_trials`` and ``max_epochs`` in both arms. Search space, identical in both arms: lr
log-uniform 1e-4..1e-1, beta1 with 1-beta1 log-uniform over 1-0.999..1-0.8 (caviar's
``reverse_log``), dropout uniform 0..0.5, weight_decay log-uniform 1e-6..1e-3. Non-fusible
hyperparameters (architecture, batch size, optimizer) are fixed in both arms. Each plain process
and each caviar slot runs torch with 1 intra-op thread per core (``--slots`` processes on as many
cores).

Clocks: ``t0`` is taken right before the arm's processes are spawned, so both arms' times include
process start-up (interpreter + torch import + dataset); database creation and the study's
creation come before ``t0`` in both arms. A trial counts when Optuna records its completion
(``datetime_complete``); the best-so-far curve uses complete trials only (as Optuna's best does).

Per seed it prints one JSON line per arm and one ``comparison`` line; the last line is a
``summary`` with medians over seeds. The target of a seed is the lower of the two arms' final
bests minus ``--epsilon`` (0.005), so both arms reach it by construction; a fixed ``--target``
can be given instead (an arm that never reaches it reports ``null``).

Usage: ``python benchmarks/time_to_quality.py [--seeds 3] [--n-trials 40] [--quick]
[--fuse 10] [--storage postgres|sqlite]``
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
DATASET = "synthetic"  # 20000 x 40, 10 classes: the defaults of trainer.load_dataset("synthetic")
VALIDATION_SPLIT = 0.2
LAYERS, HIDDEN, BATCH = 2, 128, 256
LR = (1e-4, 1e-1)
BETA1 = (0.8, 0.999)
DROPOUT = (0.0, 0.5)
WEIGHT_DECAY = (1e-6, 1e-3)


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


def caviar_definition(name: str, seed: int, n_trials: int, max_epochs: int, fuse: int) -> dict[str, Any]:
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
            "dataset": DATASET,
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
        "pruner": {"type": "hyperband", "options": {"min_resource": 1, "reduction_factor": 3}},
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
    from caviar.service.studies.service import create_study, parse_definition

    storage.upgrade(url)
    db = Database(url)
    name = f"ttq-caviar-{seed}"
    create_study(
        db, parse_definition(caviar_definition(name, seed, args.n_trials, args.max_epochs, args.fuse))
    )
    db.dispose()
    env = {"CAVIAR_ARTIFACT_DIR": str(tmp / f"artifacts-{seed}")}
    server, base = processes.serve(url, env=env, log=tmp / f"serve-{seed}.log")
    command = ["worker", "--url", base, "--gpus", "none", "--cpu", str(args.slots), "--study", name]
    command += ["--fuse", str(args.fuse), "--exit-when-idle", "0.5", "--poll-interval", "0.2"]
    with server:
        t0 = time.time()
        worker = processes.CaviarProcess(command, log=tmp / f"caviar-{seed}.log", cwd=tmp)
        code = worker.wait(timeout=args.timeout)
        exited = time.time() - t0
    if code != 0:
        raise RuntimeError(f"caviar worker exited {code}: {worker.output(3000)}")
    arm = analyse(url, name, t0)
    arm["processes_exited_s"] = exited
    return arm


# ---- the plain arm -------------------------------------------------------------------------


def plain_worker(url: str, name: str, n_trials: int, seed: int, index: int) -> None:
    """One process of the plain arm: Optuna's PyTorch example, adapted to this task."""
    import optuna
    import torch

    from benchmarks.baseline import train_plain
    from caviar.trainer import TrialConfig, load_dataset

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = load_dataset(DATASET, VALIDATION_SPLIT, seed=0)
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

        result = train_plain(config, data, report, feed="dataloader")
        if result.pruned:
            raise optuna.TrialPruned()
        return result.metrics["val_accuracy"]

    study = optuna.load_study(
        study_name=name,
        storage=url,
        sampler=optuna.samplers.TPESampler(seed=seed * 1000 + index),
        pruner=optuna.pruners.MedianPruner(),
    )
    study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=None)])


def run_plain(url: str, tmp: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"ttq-plain-{seed}"
    optuna.create_study(study_name=name, storage=url, direction="maximize")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TTQ_MAX_EPOCHS": str(args.max_epochs)}
    logs = [open(tmp / f"plain-{seed}-{i}.log", "wb") for i in range(args.slots)]  # noqa: SIM115
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
    return arm


# ---- analysis ------------------------------------------------------------------------------


@dataclass
class Curve:
    """Best-so-far of complete trials over wall time since t0."""

    times: list[float]  # completion times of the complete trials, ascending
    bests: list[float]  # running best at each of those times

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
    times, bests, best = [], [], -math.inf
    for trial in complete:
        assert trial.datetime_complete is not None and trial.value is not None
        best = max(best, trial.value)
        times.append(trial.datetime_complete.timestamp() - t0)
        bests.append(best)
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
        "_curve": Curve(times, bests),
        "_timeline": timeline,
        "n_trials": len(trials),
        "complete": len(complete),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "epochs": sum(len(t.intermediate_values) for t in trials),
        "startup_s": min(starts) if starts else None,  # spawn + imports + data until the first trial
        "wall_s": max(ends) if ends else None,  # until the last trial finished
        "final_best": bests[-1] if bests else None,
    }


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def ratio(plain: float | None, caviar: float | None) -> float | None:
    if plain is None or caviar is None or caviar <= 0:
        return None
    return round(plain / caviar, 2)


def compare(seed: int, arms: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One line per arm plus a comparison line for one seed."""
    finals = [a["final_best"] for a in arms.values()]
    if None in finals:
        raise RuntimeError(f"seed {seed}: an arm completed no trial (all pruned or failed); raise --n-trials")
    target = args.target if args.target is not None else min(finals) - args.epsilon
    strict = min(finals)  # the weaker arm's final best itself: reaching it needs search, not one good trial
    budget = min(a["wall_s"] for a in arms.values())
    lines: list[dict[str, Any]] = []
    derived: dict[str, dict[str, Any]] = {}
    for arm_name, arm in arms.items():
        curve: Curve = arm["_curve"]
        ttt = curve.time_to(target)
        derived[arm_name] = {
            "time_to_target_s": ttt,
            "time_to_target_after_startup_s": None if ttt is None else ttt - arm["startup_s"],
            "best_at_equal_budget": curve.best_at(budget),
            "time_to_strict_target_s": curve.time_to(strict),
        }
        line = {
            "seed": seed,
            "arm": arm_name,
            "target": round(target, 4),
            "time_to_target_s": rounded(ttt),
            "time_to_target_after_startup_s": rounded(derived[arm_name]["time_to_target_after_startup_s"]),
            "strict_target": round(strict, 4),
            "time_to_strict_target_s": rounded(derived[arm_name]["time_to_strict_target_s"]),
            "equal_budget_s": rounded(budget),
            "best_at_equal_budget": rounded(derived[arm_name]["best_at_equal_budget"], 4),
            "final_best": rounded(arm["final_best"], 4),
            "wall_s": rounded(arm["wall_s"]),
            "startup_s": rounded(arm["startup_s"]),
            "processes_exited_s": rounded(arm["processes_exited_s"]),
            "epochs_trained": arm["epochs"],
            "n_trials": arm["n_trials"],
            "complete": arm["complete"],
            "pruned": arm["pruned"],
            "failed": arm["failed"],
        }
        if args.timeline:
            line["timeline"] = arm["_timeline"]
        lines.append(line)
    c, p = derived["caviar"], derived["plain"]
    lines.append(
        {
            "seed": seed,
            "arm": "comparison",
            "target": round(target, 4),
            "speedup_time_to_target": ratio(p["time_to_target_s"], c["time_to_target_s"]),
            "speedup_time_to_target_after_startup": ratio(
                p["time_to_target_after_startup_s"], c["time_to_target_after_startup_s"]
            ),
            "speedup_time_to_strict_target": ratio(
                p["time_to_strict_target_s"], c["time_to_strict_target_s"]
            ),
            "speedup_wall": ratio(arms["plain"]["wall_s"], arms["caviar"]["wall_s"]),
            "epochs_ratio_caviar_over_plain": ratio(arms["caviar"]["epochs"], arms["plain"]["epochs"]),
            "final_best_delta_caviar_minus_plain": round(
                arms["caviar"]["final_best"] - arms["plain"]["final_best"], 4
            ),
            "best_at_equal_budget_delta_caviar_minus_plain": (
                None
                if c["best_at_equal_budget"] is None or p["best_at_equal_budget"] is None
                else round(c["best_at_equal_budget"] - p["best_at_equal_budget"], 4)
            ),
        }
    )
    return lines


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 4) if present else None


def summary(lines: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    def of(arm: str, key: str) -> float | None:
        return median([line[key] for line in lines if line["arm"] == arm])

    out: dict[str, Any] = {
        "arm": "summary",
        "seeds": args.seeds,
        "storage": args.storage,
        "task": (
            f"{DATASET} 20000x40 10 classes, MLP {LAYERS}x{HIDDEN}, batch {BATCH}, adam, "
            f"{args.n_trials} trials, {args.max_epochs} epochs"
        ),
        "slots": args.slots,
        "torch_threads_per_process": 1,
        "fuse": args.fuse,
        "target_rule": (
            f"fixed {args.target}"
            if args.target is not None
            else f"per seed: min(final bests) - {args.epsilon}"
        ),
    }
    for arm in ("caviar", "plain"):
        for key in (
            "time_to_target_s",
            "time_to_target_after_startup_s",
            "time_to_strict_target_s",
            "best_at_equal_budget",
            "final_best",
            "wall_s",
            "startup_s",
            "epochs_trained",
        ):
            out[f"median_{arm}_{key}"] = of(arm, key)
    for key in (
        "speedup_time_to_target",
        "speedup_time_to_target_after_startup",
        "speedup_time_to_strict_target",
        "speedup_wall",
        "epochs_ratio_caviar_over_plain",
        "final_best_delta_caviar_minus_plain",
        "best_at_equal_budget_delta_caviar_minus_plain",
    ):
        out[f"median_{key}"] = of("comparison", key)
    return out


# ---- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run both arms for every seed and print JSON lines."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--plain-worker":
        url, name, n_trials, seed, index = argv[1:6]
        plain_worker(url, name, int(n_trials), int(seed), int(index))
        return
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds, each one caviar + one plain run (3)")
    parser.add_argument("--n-trials", type=int, default=None, help="trials per run (40; quick 12)")
    parser.add_argument("--max-epochs", type=int, default=None, help="epochs per trial (15; quick 6)")
    parser.add_argument("--fuse", type=int, default=None, help="fused group size (n_trials / (2 slots))")
    parser.add_argument("--slots", type=int, default=2, help="processes per arm, one per core (2)")
    parser.add_argument("--storage", choices=("postgres", "sqlite", "auto"), default="auto")
    parser.add_argument("--target", type=float, default=None, help="fixed val_accuracy target")
    parser.add_argument("--epsilon", type=float, default=0.005, help="target = min(final bests) - this")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per arm before giving up")
    parser.add_argument("--timeline", action="store_true", help="add every trial's start/end to arm lines")
    parser.add_argument("--quick", action="store_true", help="1 seed, 12 trials, 6 epochs (< 90 s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = 1
    args.n_trials = args.n_trials or (12 if args.quick else 40)
    args.max_epochs = args.max_epochs or (6 if args.quick else 15)
    args.fuse = args.fuse or max(1, math.ceil(args.n_trials / (2 * args.slots)))
    if args.storage == "auto":
        args.storage = "postgres" if postgres_available() else "sqlite"
    tmp = Path(tempfile.mkdtemp(prefix="caviar-ttq-"))
    lines: list[dict[str, Any]] = []
    try:
        for seed in range(args.seeds):
            arms: dict[str, dict[str, Any]] = {}
            order = ("caviar", "plain") if seed % 2 == 0 else ("plain", "caviar")  # alternate for drift
            for arm_name in order:
                with database(args.storage, tmp, f"{arm_name}{seed}") as url:
                    runner = run_caviar if arm_name == "caviar" else run_plain
                    arms[arm_name] = runner(url, tmp, seed, args)
            for line in compare(seed, arms, args):
                print(json.dumps(line), flush=True)
                lines.append(line)
        print(json.dumps(summary(lines, args)), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
