"""Tune from anywhere with ``caviar.Client``: your loop asks, trains, reports and tells (``kind: external``).

Against a running service (``caviar serve``, or ``--url`` of a remote one):

    python examples/client_optimize.py [--url http://127.0.0.1:8000] [--token T] [--n-jobs 2]

``study.optimize`` runs the objective until the study's global budget is used, whoever else works
on the same study; each trial heartbeats in the background; ``trial.should_prune()`` answers the
pruner's decision for the last ``trial.report(value, step)``.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import caviar

DEFINITION = {
    "name": "digits-softmax",
    "direction": "maximize",
    "metric": "val_accuracy",
    "search_space": {
        "lr": {"type": "float", "low": 1e-3, "high": 1.0, "scale": "log"},
        "momentum": {"type": "float", "low": 0.5, "high": 0.99, "scale": "reverse_log"},
        "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "scale": "log"},
    },
    "objective": {"kind": "external"},
    "pruner": {"type": "median", "options": {"n_startup_trials": 3, "n_warmup_steps": 2}},
    "budget": {"n_trials": 16, "max_parallel": 4},
}

x, y = load_digits(return_X_y=True)
x_train, x_val, y_train, y_val = (
    torch.tensor(a, dtype=torch.float32 if a.dtype.kind == "f" else torch.long)
    for a in train_test_split(x / 16.0, y, test_size=0.25, stratify=y, random_state=0)
)


def objective(trial: caviar.Trial) -> float:
    torch.manual_seed(trial.number)
    model = nn.Linear(64, 10)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=trial.params["lr"],
        momentum=trial.params["momentum"],
        weight_decay=trial.params["weight_decay"],
    )
    accuracy = 0.0
    for epoch in range(10):
        for batch in torch.randperm(len(x_train)).split(64):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = (model(x_val).argmax(dim=1) == y_val).float().mean().item()
        trial.report(accuracy, epoch)  # Optuna's order: value, step
        if trial.should_prune():
            raise caviar.TrialPruned()
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", default=None, help="the service (default: CAVIAR_URL or http://127.0.0.1:8000)"
    )
    parser.add_argument("--token", default=None, help="a write token (default: CAVIAR_API_TOKEN)")
    parser.add_argument("--name", default=DEFINITION["name"])
    parser.add_argument("--n-jobs", type=int, default=2)
    args = parser.parse_args()
    client = caviar.Client(args.url, args.token)
    try:
        study = client.create_study({**DEFINITION, "name": args.name})
    except caviar.CaviarApiError as exc:
        if exc.code != "name_taken":
            raise
        study = client.study(args.name)  # run again: carry on with the same study
    finished = study.optimize(objective, n_jobs=args.n_jobs)
    best = study.best()
    print(
        f"this run finished {finished} trials; best #{best['number']}: {best['value']:.4f} {best['params']}"
    )


if __name__ == "__main__":
    main()
