"""Your own PyTorch model, K trials of it trained as one (``kind: python`` with ``fuse: K``).

The worker calls ``objective(trials)`` with a list of up to K trials that share the study's
``shared`` parameters (here the architecture: ``hidden``, ``dropout``) and differ in the rest
(``lr``, ``beta1``). :class:`caviar.FusedModels` stacks the K models and trains them in one
forward/backward/step, each member exactly as it would train alone on the same batches; each
trial is pruned on its own (a pruned member stops updating, the others train on), the group's
values of an epoch go to the service in one request (``caviar.report_group``), and the returned
list holds one value per trial (None for a pruned one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split
from torch import nn

import caviar

EPOCHS = 30
BATCH = 16


class WineNet(nn.Module):
    """A small MLP: 13 features -> 3 cultivars."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(13, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_wine(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    as_tensor = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return as_tensor(x_train), torch.tensor(y_train), as_tensor(x_val), torch.tensor(y_val)


def fit(
    params: Sequence[dict[str, Any]],
    seeds: Sequence[int],
    report: Callable[[int, dict[int, float]], set[int]],
    epochs: int = EPOCHS,
) -> tuple[caviar.FusedModels, list[float], list[list[float]]]:
    """Train one member per ``params`` (initialised from its seed), all on the same batches.

    ``report(epoch, {member: accuracy})`` (the live members) returns the members to stop. Returns the fused
    models, each member's last validation accuracy, and the members' training losses per step.
    """
    x_train, y_train, x_val, y_val = load_data()
    models = []
    for p, seed in zip(params, seeds, strict=True):
        torch.manual_seed(seed)  # each member's own initialisation, as in a solo run
        models.append(WineNet(hidden=int(p["hidden"]), dropout=p["dropout"]))
    fused = caviar.FusedModels(models)
    optimizer = fused.optimizer(
        "adam", lr=[p["lr"] for p in params], betas=([p["beta1"] for p in params], 0.999)
    )
    order = torch.Generator().manual_seed(0)  # the batches: the same for every member
    accuracy = [0.0] * len(params)
    losses: list[list[float]] = []
    for epoch in range(epochs):
        fused.train()
        for batch in torch.randperm(len(x_train), generator=order).split(BATCH):
            loss = fused.losses(nn.functional.cross_entropy, fused(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()  # each member gets its own gradients
            optimizer.step()
            losses.append(loss.tolist())
        fused.eval()
        with torch.no_grad():
            hits = fused(x_val).argmax(dim=-1) == y_val  # (K, N)
        live = [member for member in range(len(params)) if fused.active[member]]
        scores = hits.float().mean(dim=-1).tolist()  # one transfer for the whole group
        for member in live:
            accuracy[member] = scores[member]
        for member in report(epoch, {member: accuracy[member] for member in live}):
            fused.drop(member)  # pruned: it stops updating, its place stays empty
        if not fused.active.any():
            break
    return fused, accuracy, losses


def objective(trials: list[caviar.Trial]) -> list[float | None]:
    def report(epoch: int, accuracies: dict[int, float]) -> set[int]:
        members = list(accuracies)  # one request for the epoch (each trial's own report, pruned alone)
        prune = caviar.report_group([trials[m] for m in members], list(accuracies.values()), epoch)
        return {m for m, stop in zip(members, prune, strict=True) if stop}

    fused, accuracy, _ = fit([t.params for t in trials], [t.number for t in trials], report)
    values: list[float | None] = []
    for member, trial in enumerate(trials):
        if not fused.active[member]:
            values.append(None)  # pruned
            continue
        torch.save(fused.state_dict(member), f"model-{trial.number}.pt")  # one model's state_dict
        trial.upload(f"model-{trial.number}.pt", filename="model.pt")
        values.append(accuracy[member])
    return values
