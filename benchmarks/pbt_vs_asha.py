"""Benchmark: population-based training inside a fused group vs ASHA, same epoch budget.

Task, model and search space are time_to_quality.py's (``make_classification`` 20,000 x 60, 8
classes; MLP 2 x 128, batch 256, Adam; lr log 1e-5..1, beta1 reverse-log 0.5..0.999, dropout
0..0.6, weight decay log 1e-6..1e-1); ``--quick`` uses its 6,000-row variant. Both arms run in
this process on caviar's own fused trainer (:func:`caviar.trainer.train_group`, one torch thread),
with no service in between, so only the policy differs:

* ``pbt``: one fused group of ``--population`` members (the first draws of a seeded TPE sampler:
  its random start-up points), ``max_epochs`` each, exploit/explore every ``--interval`` epochs
  (quantile 0.25, factors 0.8/1.2, resample probability 0.25; :class:`caviar.trainer.PBT` over
  the four hyperparameters, as the worker builds it for ``pruner: {type: pbt}``). Epoch budget:
  ``population * max_epochs``.
* ``asha``: Optuna TPE (same seed) with time_to_quality.py's ``asha`` pruner
  (``SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)``, asynchronous), trials trained in
  fused groups of ``--population`` with refill (a pruned member's place is taken by a new trial at
  once, as the caviar worker does), reporting every epoch. Training stops the moment the arm has
  trained the same number of member-epochs as the PBT arm; trials still running then do not count.

The score is the final validation accuracy of the best trial (PBT: of the best member at its last
epoch; ASHA: of the best complete trial at its last epoch), per seed and as the median over
seeds. One JSON line per seed and arm, then a ``summary`` line.

Usage: ``python benchmarks/pbt_vs_asha.py [--seeds 3] [--population 8] [--max-epochs 15]
[--interval 3] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.time_to_quality import (  # noqa: E402
    BATCH,
    BETA1,
    DROPOUT,
    HIDDEN,
    LAYERS,
    LR,
    VALIDATION_SPLIT,
    WEIGHT_DECAY,
    make_task,
)

QUANTILE, FACTORS, RESAMPLE = 0.25, (0.8, 1.2), 0.25


def sample(trial: Any) -> dict[str, float]:
    """The time_to_quality search space, as Optuna suggestions (beta1 through 1 - beta1, log)."""
    return {
        "lr": trial.suggest_float("lr", *LR, log=True),
        "beta1": 1.0 - trial.suggest_float("one_minus_beta1", 1.0 - BETA1[1], 1.0 - BETA1[0], log=True),
        "dropout": trial.suggest_float("dropout", *DROPOUT),
        "weight_decay": trial.suggest_float("weight_decay", *WEIGHT_DECAY, log=True),
    }


def config(values: dict[str, Any], seed: int, max_epochs: int) -> Any:
    from caviar.trainer import TrialConfig

    return TrialConfig(
        layers=LAYERS,
        hidden_units=HIDDEN,
        batch_size=BATCH,
        optimizer="adam",
        max_epochs=max_epochs,
        seed=seed,
        device="cpu",
        **values,
    )


def study(seed: int) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
    )


def run_pbt(data: Any, seed: int, population: int, max_epochs: int, interval: int) -> dict[str, Any]:
    from caviar import trainer

    draws = study(seed)
    configs = [config(sample(draws.ask()), seed * 1000 + i, max_epochs) for i in range(population)]
    settings = trainer.PBT(
        (
            trainer.Dimension("lr", *LR, "log"),
            trainer.Dimension("beta1", *BETA1, "reverse_log"),
            trainer.Dimension("dropout", *DROPOUT, "linear"),
            trainer.Dimension("weight_decay", *WEIGHT_DECAY, "log"),
        ),
        interval=interval,
        quantile=QUANTILE,
        factors=FACTORS,
        resample_probability=RESAMPLE,
        seed=seed,
        maximize=True,
    )
    exploits: list[trainer.Exploit] = []
    start = time.perf_counter()
    results = trainer.train_group(
        configs, data, metric="val_accuracy", population=trainer.Population(settings, exploits.append)
    )
    scores = [r.metrics["val_accuracy"] for r in results]
    return {
        "arm": "pbt",
        "seed": seed,
        "best_val_accuracy": max(scores),
        "epochs": sum(r.epochs for r in results),
        "trials": len(results),
        "exploits": len(exploits),
        "seconds": round(time.perf_counter() - start, 2),
    }


def run_asha(data: Any, seed: int, population: int, max_epochs: int, budget: int) -> dict[str, Any]:
    import optuna

    from caviar import trainer

    tpe = study(seed)
    held: list[Any] = []  # optuna trial of each member index
    used = 0
    stop = threading.Event()

    def ask(count: int) -> list[Any]:
        configs = []
        for _ in range(count):
            if used >= budget:
                break
            trial = tpe.ask()
            held.append(trial)
            configs.append(config(sample(trial), seed * 1000 + len(held) - 1, max_epochs))
        return configs

    def report(member: int, step: int, value: float) -> bool:
        nonlocal used
        used += 1
        if used >= budget:
            stop.set()  # the budget is spent: stop at the next mini-batch
        held[member].report(value, step)
        return bool(held[member].should_prune())

    def record(member: int, result: Any) -> None:
        if result.pruned:
            tpe.tell(held[member], state=optuna.trial.TrialState.PRUNED)
        else:
            tpe.tell(held[member], result.metrics["val_accuracy"])

    start = time.perf_counter()
    with contextlib.suppress(trainer.Interrupted):  # the budget ran out mid-epoch
        trainer.train_group(
            ask(population), data, report, metric="val_accuracy", on_result=record, refill=ask, interrupt=stop
        )
    complete = [t for t in tpe.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {
        "arm": "asha",
        "seed": seed,
        "best_val_accuracy": max((t.value for t in complete), default=None),
        "epochs": used,
        "trials": len(held),
        "complete": len(complete),
        "pruned": sum(1 for t in tpe.trials if t.state == optuna.trial.TrialState.PRUNED),
        "seconds": round(time.perf_counter() - start, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the 6,000-row task")
    args = parser.parse_args(argv)

    import torch

    from caviar import trainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = trainer.load_dataset(make_task(Path(tmp), args.quick), VALIDATION_SPLIT, seed=0)
    budget = args.population * args.max_epochs
    scores: dict[str, list[float]] = {"pbt": [], "asha": []}
    for seed in range(args.seeds):
        for arm in ("pbt", "asha") if seed % 2 == 0 else ("asha", "pbt"):
            if arm == "pbt":
                line = run_pbt(data, seed, args.population, args.max_epochs, args.interval)
            else:
                line = run_asha(data, seed, args.population, args.max_epochs, budget)
            print(json.dumps(line), flush=True)
            if line["best_val_accuracy"] is not None:
                scores[arm].append(line["best_val_accuracy"])
    summary = {
        "summary": True,
        "task": "quick" if args.quick else "full",
        "epoch_budget": budget,
        "population": args.population,
        "max_epochs": args.max_epochs,
        "interval": args.interval,
        **{
            f"{arm}_median_best_val_accuracy": statistics.median(values) if values else None
            for arm, values in scores.items()
        },
        **{f"{arm}_per_seed": values for arm, values in scores.items()},
        "pbt_wins_seeds": sum(p > a for p, a in zip(scores["pbt"], scores["asha"], strict=False)),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
