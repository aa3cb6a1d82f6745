"""Benchmark: fused training of K trials vs the same K trials in a tight plain PyTorch loop.

For K in {1, 4, 16, 64} random configs (lr, weight decay, 1 - beta1 log-uniform; dropout uniform;
2 x 128 ReLU MLP, Adam, batch 64) on digits and the synthetic set, each arm trains the same K
configs for the same epochs on the same cores:

* ``fused`` (caviar): ``trainer.train_group`` over the configs,
* ``plain`` (the baseline a rival would accept): ``benchmarks.baseline.train_plain`` with
  ``feed="tensor"``: ``nn.Sequential`` + ``torch.optim.Adam`` on pre-loaded tensors, one
  ``randperm`` per epoch, mini-batches by slicing, one validation forward per epoch, no DataLoader,
  trials one after another,
* ``plain_dataloader`` (secondary, opt-in via ``--methods``): the same loop fed by a DataLoader,
  as Optuna's PyTorch example writes it; many people write this, it is not the bar,
* ``sequential`` (opt-in): K ``trainer.train`` calls (caviar's trainer, unfused),
* ``user_fused`` (opt-in): the plain arm's own ``nn.Sequential`` (``baseline.build_mlp``, same
  seeds, so the same initial weights), K of them stacked by ``caviar.FusedModels`` (``torch.func``)
  with per-member Adam: what a ``kind: python`` objective with ``fuse`` gets for its own model.
  Members share one batch order and ``nn.Dropout``'s rate (the first config's): a module's
  dropout rate is its architecture.

Both arms use ``--procs`` long-lived processes (default: one per core) with ``--threads`` torch
threads each (default 1): the K configs are dealt round-robin to the processes, so the plain arm
is "one process per core, one thread each" and the fused arm is "one fused group per core" (what
``caviar worker --cpu N --fuse K/N`` does). Processes load the data and warm up before any clock
starts; a measurement is the wall time from handing out the configs to the last result. Each
``--repeat`` runs every arm once, in a shuffled order (seeded by the repeat), and the JSON gives
the median over repeats with min and max; speedups are plain's median over the arm's median, with
the spread of the per-repeat ratios. All arms are deterministic for fixed seeds: accuracies are
the same in every repeat.

``--datasets ttq`` runs the task of ``time_to_quality.py`` (batch 256): how much faster fusing
trains that search's epochs, which bounds its time-to-quality gain.

Usage: ``python benchmarks/fused_training.py [--quick] [--ks 1,4,16,64] [--repeat 5] [--procs 2]
[--datasets digits,synthetic,ttq]``
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` from a checkout
    sys.path.insert(0, str(ROOT))

from caviar.trainer import TrialConfig  # noqa: E402

LAYERS, HIDDEN = 2, 128
METHODS = ("fused", "plain", "plain_dataloader", "sequential", "user_fused")


def sample_configs(k: int, epochs: int, seed: int, batch: int = 64) -> list[TrialConfig]:
    """K random Adam configs: lr, weight_decay, 1 - beta1 log-uniform; dropout uniform."""
    rng = random.Random(seed)

    def log_uniform(low: float, high: float) -> float:
        return math.exp(rng.uniform(math.log(low), math.log(high)))

    return [
        TrialConfig(
            layers=LAYERS,
            hidden_units=HIDDEN,
            batch_size=batch,
            max_epochs=epochs,
            optimizer="adam",
            lr=log_uniform(5e-4, 5e-3),
            weight_decay=log_uniform(1e-6, 1e-3),
            beta1=1.0 - log_uniform(0.05, 0.2),
            dropout=rng.uniform(0.0, 0.3),
            init="xavier",  # closest to nn.Linear's default init scale used by the plain loop
            seed=seed * 1000 + i,
            device="cpu",
        )
        for i in range(k)
    ]


# ---- the per-core processes ----------------------------------------------------------------


def train_user_fused(configs: list[TrialConfig], data: Any) -> list[float]:
    """The plain arm's models and loop, the K members fused by :class:`caviar.FusedModels`."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    import caviar
    from benchmarks.baseline import build_mlp

    first = configs[0]
    models = []
    for config in configs:
        torch.manual_seed(config.seed)  # as train_plain: the same initial weights
        shared = dataclasses.replace(config, dropout=first.dropout)
        models.append(build_mlp(shared, data.n_features, data.n_classes))
    fused = caviar.FusedModels(models)
    optimizer = fused.optimizer(
        first.optimizer,
        lr=[c.lr for c in configs],
        betas=([c.beta1 for c in configs], [c.beta2 for c in configs]),
        eps=[c.eps for c in configs],
        weight_decay=[c.weight_decay for c in configs],
    )
    generator = torch.Generator().manual_seed(first.seed)
    x_train, y_train, x_val, y_val = data.X_train, data.y_train, data.X_val, data.y_val
    n, batch = len(x_train), first.batch_size
    accuracy: list[float] = []
    for _ in range(first.max_epochs):
        fused.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            index = order[start : start + batch]
            losses = fused.losses(F.cross_entropy, fused(x_train[index]), y_train[index])
            optimizer.zero_grad()
            losses.sum().backward()
            optimizer.step()
        fused.eval()
        with torch.no_grad():
            accuracy = (fused(x_val).argmax(dim=-1) == y_val).float().mean(dim=1).tolist()
    return accuracy


def _train(method: str, configs: list[TrialConfig], data: Any) -> list[float]:
    from benchmarks.baseline import train_plain
    from caviar.trainer import train, train_group

    if not configs:
        return []
    if method == "user_fused":
        return train_user_fused(configs, data)
    if method == "fused":
        return [r.metrics["val_accuracy"] for r in train_group(configs, data)]
    if method == "sequential":
        return [train(c, data).metrics["val_accuracy"] for c in configs]
    feed = "dataloader" if method == "plain_dataloader" else "tensor"
    return [train_plain(c, data, feed=feed).metrics["val_accuracy"] for c in configs]


def _serve(dataset: str, options: dict[str, Any], threads: int, batch: int, tasks: Any, results: Any) -> None:
    """One process: load the data, warm up every method, then train what it is handed."""
    import torch

    from caviar.trainer import load_dataset

    torch.set_num_threads(threads)
    data = load_dataset(dataset, validation_split=0.2, seed=0, **options)
    for method in METHODS:  # allocator, kernels, lazy imports
        _train(method, sample_configs(2, 1, seed=99, batch=batch), data)
    results.put(("ready", len(data.X_train)))
    while (task := tasks.get()) is not None:
        method, configs = task
        results.put(("done", _train(method, configs, data)))


class Pool:
    """``procs`` long-lived processes on one dataset; ``run`` deals configs round-robin."""

    def __init__(self, procs: int, dataset: str, options: dict[str, Any], threads: int, batch: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(procs)]
        self.processes = [
            ctx.Process(target=_serve, args=(dataset, options, threads, batch, q, self.results), daemon=True)
            for q in self.tasks
        ]
        for process in self.processes:
            process.start()
        ready = [self.results.get(timeout=600)[1] for _ in self.processes]
        self.n_train: int = ready[0]

    def run(self, method: str, configs: list[TrialConfig]) -> tuple[float, list[float]]:
        """Train the configs with ``method``; (wall seconds, val accuracies in no fixed order)."""
        shares = [configs[i :: len(self.tasks)] for i in range(len(self.tasks))]
        busy = [(q, share) for q, share in zip(self.tasks, shares, strict=True) if share]
        start = time.perf_counter()
        for queue, share in busy:
            queue.put((method, share))
        accuracies = [a for _ in busy for a in self.results.get(timeout=3600)[1]]
        return time.perf_counter() - start, accuracies

    def close(self) -> None:
        for queue in self.tasks:
            queue.put(None)
        for process in self.processes:
            process.join(30)


# ---- main ----------------------------------------------------------------------------------


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print JSON lines."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--quick", action="store_true", help="small data, K <= 16, 3 epochs (< 60 s)")
    parser.add_argument("--procs", type=int, default=None, help="processes per arm (default: cores)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--ks", default=None, help="comma-separated K (default 1,4,16,64; quick 1,4,16)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 10; quick 3)")
    parser.add_argument(
        "--datasets",
        default="digits,synthetic",
        help="comma-separated: digits, synthetic, ttq (time_to_quality.py's task, batch 256)",
    )
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64; ttq 256)")
    parser.add_argument("--repeat", type=int, default=None, help="runs of every arm (default 3; quick 1)")
    parser.add_argument(
        "--methods",
        default="fused",
        help="arms besides plain: fused, plain_dataloader, sequential, user_fused (comma-separated; "
        "default fused)",
    )
    args = parser.parse_args(argv)
    procs = args.procs or min(2, os.cpu_count() or 1)
    repeat = args.repeat or (1 if args.quick else 3)
    ks = [int(k) for k in (args.ks or ("1,4,16" if args.quick else "1,4,16,64")).split(",")]
    epochs = args.epochs or (3 if args.quick else 10)
    methods = ["plain", *(m for m in args.methods.split(",") if m and m != "plain")]
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
    folder = Path(tempfile.mkdtemp(prefix="caviar-fused-"))
    for name in args.datasets.split(","):
        options: dict[str, Any] = {"n_samples": 4000} if name == "synthetic" and args.quick else {}
        source, batch = name, args.batch or 64
        if name == "ttq":  # the time-to-quality task: how much faster fusing makes that search's epochs
            from benchmarks.time_to_quality import make_task

            source, batch = str(make_task(folder, args.quick)), args.batch or 256
        pool = Pool(procs, source, options, args.threads, batch)
        try:
            for k in ks:
                configs = sample_configs(k, epochs, seed=k, batch=batch)
                seconds: dict[str, list[float]] = {m: [] for m in methods}
                accuracies: dict[str, list[float]] = {}
                for r in range(repeat):
                    order = list(methods)
                    random.Random(1000 * k + r).shuffle(order)
                    for method in order:
                        wall, accuracies[method] = pool.run(method, configs)
                        seconds[method].append(wall)
                plain = statistics.median(seconds["plain"])
                plain_acc = sum(accuracies["plain"]) / k
                for method in methods:
                    median = statistics.median(seconds[method])
                    mean_acc = sum(accuracies[method]) / k
                    ratios = [p / s for p, s in zip(seconds["plain"], seconds[method], strict=True)]
                    line = {
                        "dataset": name,
                        "n_train": pool.n_train,
                        "K": k,
                        "method": method,
                        "role": {
                            "plain": "baseline (tight tensor loop)",
                            "plain_dataloader": "secondary baseline (DataLoader, Optuna-example style)",
                            "user_fused": "caviar.FusedModels over the plain arm's nn.Sequential",
                        }.get(method, "caviar"),
                        "epochs": epochs,
                        "batch_size": batch,
                        "procs": min(procs, k),
                        "threads_per_proc": args.threads,
                        "repeat": repeat,
                        "seconds": spread(seconds[method]),
                        "trials_per_s": round(k / median, 3),
                        "plain_trials_per_s": round(k / plain, 3),
                        "speedup_vs_plain": round(plain / median, 2),
                        "speedup_vs_plain_per_repeat": spread(ratios, 2),
                        "mean_val_accuracy": round(mean_acc, 4),
                        "best_val_accuracy": round(max(accuracies[method]), 4),
                        "accuracy_delta_vs_plain": round(mean_acc - plain_acc, 4),
                    }
                    print(json.dumps(line), flush=True)
        finally:
            pool.close()
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
