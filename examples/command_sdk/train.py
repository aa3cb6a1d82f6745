"""A training script tuned through ``kind: command``: it takes its hyperparameters as flags and
reports with caviar's SDK.

Run alone, it trains once (``python train.py --lr 0.01``). Run by a caviar worker (the study's
command fills in ``{lr}`` and ``{weight_decay}``), ``caviar.current_trial()`` is the trial: the
script reports every epoch (``trial.report(value, step)``; when ``trial.should_prune()`` it raises
``caviar.TrialPruned`` and lets it escape: the trial ends PRUNED) and tells its result.
"""

from __future__ import annotations

import argparse
import os

import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch import nn

import caviar


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    trial = caviar.current_trial() if "CAVIAR_TRIAL" in os.environ else None

    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    x_train_t = torch.tensor((x_train - mean) / std, dtype=torch.float32)
    x_val_t = torch.tensor((x_val - mean) / std, dtype=torch.float32)
    y_train_t, y_val_t = torch.tensor(y_train, dtype=torch.float32), torch.tensor(y_val, dtype=torch.float32)

    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    loss = torch.tensor(0.0)
    for epoch in range(args.epochs):
        for batch in torch.randperm(len(x_train_t)).split(32):
            loss = nn.functional.binary_cross_entropy_with_logits(
                model(x_train_t[batch]).squeeze(1), y_train_t[batch]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            val_loss = nn.functional.binary_cross_entropy_with_logits(
                model(x_val_t).squeeze(1), y_val_t
            ).item()
        print(f"epoch {epoch}: train loss {loss.item():.4f}, val loss {val_loss:.4f}", flush=True)
        if trial is not None:
            trial.report(val_loss, epoch)
            if trial.should_prune():
                raise caviar.TrialPruned()  # escapes: the worker records the trial PRUNED
    if trial is not None:
        trial.tell(val_loss)


if __name__ == "__main__":
    main()
