"""Benchmark: fused training of K trials vs K sequential trials vs a plain PyTorch loop.

For K in {1, 4, 16, 64} random configs (lr, weight decay, beta1 log-uniform; dropout uniform) on
digits and the synthetic set, it times

* ``fused``: one ``trainer.train_group`` call over the K configs,
* ``sequential``: K ``trainer.train`` calls,
* ``reference``: K runs of a plain PyTorch loop written like Optuna's PyTorch example
  (``nn.Sequential`` MLP, ``torch.optim.Adam``, ``DataLoader`` over a ``TensorDataset``,
  per-batch loop, per-epoch validation),

with the same architecture (2 x 128 ReLU MLP, Xavier init on our side, which matches the scale of
``nn.Linear``'s default init used by the reference), epochs and batch size, and prints one JSON
object per result. Timings are the fastest of ``--repeat`` runs.

Usage: ``python benchmarks/fused_training.py [--quick] [--threads N] [--ks 1,4,16] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.baseline import train_plain  # noqa: E402
from caviar.trainer import Dataset, TrialConfig, load_dataset, train, train_group  # noqa: E402

LAYERS, HIDDEN, BATCH = 2, 128, 64


def sample_configs(k: int, epochs: int, seed: int) -> list[TrialConfig]:
    """K random Adam configs: lr, weight_decay, 1 - beta1 log-uniform; dropout uniform."""
    rng = random.Random(seed)

    def log_uniform(low: float, high: float) -> float:
        return math.exp(rng.uniform(math.log(low), math.log(high)))

    return [
        TrialConfig(
            layers=LAYERS,
            hidden_units=HIDDEN,
            batch_size=BATCH,
            max_epochs=epochs,
            optimizer="adam",
            lr=log_uniform(5e-4, 5e-3),
            weight_decay=log_uniform(1e-6, 1e-3),
            beta1=1.0 - log_uniform(0.05, 0.2),
            dropout=rng.uniform(0.0, 0.3),
            init="xavier",  # closest to nn.Linear's default init scale used by the reference
            seed=seed * 1000 + i,
            device="cpu",
        )
        for i in range(k)
    ]


def reference_trial(config: TrialConfig, data: Dataset) -> float:
    """One trial as Optuna's PyTorch example writes it (DataLoader); the final validation accuracy."""
    return train_plain(config, data, feed="dataloader").metrics["val_accuracy"]


def run(method: str, configs: list[TrialConfig], data: Dataset, repeat: int) -> tuple[float, list[float]]:
    """Time one method over all configs ``repeat`` times; return (fastest seconds, final val accuracies).

    All three methods are deterministic for fixed seeds, so repeats only reduce timing noise.
    """
    best = math.inf
    accuracies: list[float] = []
    for _ in range(repeat):
        start = time.perf_counter()
        if method == "fused":
            accuracies = [r.metrics["val_accuracy"] for r in train_group(configs, data)]
        elif method == "sequential":
            accuracies = [train(c, data).metrics["val_accuracy"] for c in configs]
        else:
            accuracies = [reference_trial(c, data) for c in configs]
        best = min(best, time.perf_counter() - start)
    return best, accuracies


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print JSON lines."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--quick", action="store_true", help="small data, K <= 16, 3 epochs (< 60 s)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--ks", default=None, help="comma-separated K (default 1,4,16,64; quick 1,4,16)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 10; quick 3)")
    parser.add_argument("--datasets", default="digits,synthetic", help="comma-separated datasets")
    parser.add_argument("--repeat", type=int, default=1, help="time each method this often, keep the fastest")
    parser.add_argument("--methods", default="sequential,fused", help="methods; reference always runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in (args.ks or ("1,4,16" if args.quick else "1,4,16,64")).split(",")]
    epochs = args.epochs or (3 if args.quick else 10)
    for name in args.datasets.split(","):
        options: dict[str, Any] = {"n_samples": 4000} if name == "synthetic" and args.quick else {}
        data = load_dataset(name, validation_split=0.2, seed=0, **options)
        train_group(sample_configs(2, 1, seed=99), data)  # warm-up (allocator, kernels)
        reference_trial(sample_configs(1, 1, seed=99)[0], data)
        for k in ks:
            configs = sample_configs(k, epochs, seed=k)
            methods = ["reference", *(m for m in args.methods.split(",") if m != "reference")]
            measured = {method: run(method, configs, data, args.repeat) for method in methods}
            ref_seconds, ref_acc = measured["reference"]
            ref_rate = k / ref_seconds
            for method, (seconds, accuracies) in measured.items():
                rate = k / seconds
                mean_acc = sum(accuracies) / k
                line = {
                    "dataset": name,
                    "n_train": len(data.X_train),
                    "K": k,
                    "method": method,
                    "epochs": epochs,
                    "seconds": round(seconds, 3),
                    "trials_per_s": round(rate, 3),
                    "speedup_vs_reference": round(rate / ref_rate, 2),
                    "mean_val_accuracy": round(mean_acc, 4),
                    "best_val_accuracy": round(max(accuracies), 4),
                    "accuracy_delta_vs_reference": round(mean_acc - sum(ref_acc) / k, 4),
                    "repeat": args.repeat,
                    "threads": torch.get_num_threads(),
                }
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
