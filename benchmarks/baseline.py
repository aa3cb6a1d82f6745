"""The plain PyTorch loop caviar is measured against: what a competent engineer writes by hand.

One trial of a :class:`~caviar.trainer.TrialConfig` as a standard ``nn.Sequential`` MLP trained
with ``torch.optim``, in one of two feeding styles:

* ``tensor`` (the fair baseline): the data stay in memory as tensors; one ``randperm`` per epoch,
  mini-batches by slicing, one validation forward per epoch, one host synchronisation per epoch.
* ``dataloader``: the same model and optimizer fed by ``DataLoader(TensorDataset(...))``, as
  Optuna's PyTorch example does (kept as a second, labelled line: many people write this).

The benchmarks and the tests (the trainer is compared step by step with this loop) share it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from caviar.trainer import Dataset, TrialConfig, lr_at

Report = Callable[[int, float], bool]
"""``report(epoch, value) -> prune?``: value is ``val_accuracy``."""


@dataclass
class PlainResult:
    """What one plain trial produced."""

    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    epochs: int = 0
    pruned: bool = False
    seconds: float = 0.0


def build_mlp(config: TrialConfig, n_features: int, n_classes: int) -> nn.Sequential:
    """``layers`` x (Linear [+ BatchNorm1d] + ReLU + Dropout) + a Linear head; He or Xavier init."""
    modules: list[nn.Module] = []
    width = n_features
    for _ in range(config.layers):
        modules.append(nn.Linear(width, config.hidden_units, bias=not config.batch_norm))
        if config.batch_norm:
            modules.append(nn.BatchNorm1d(config.hidden_units))
        modules += [nn.ReLU(), nn.Dropout(config.dropout)]
        width = config.hidden_units
    modules.append(nn.Linear(width, n_classes))
    model = nn.Sequential(*modules)
    for module in model:
        if isinstance(module, nn.Linear):
            if config.init == "he":
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def build_optimizer(config: TrialConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer for a config (L2 as ``weight_decay``; decoupled for AdamW)."""
    params, lr, wd = model.parameters(), config.lr, config.weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if config.optimizer == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=config.beta2, eps=config.eps, weight_decay=wd)
    betas = (config.beta1, config.beta2)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=config.eps, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=config.eps, weight_decay=wd)


def train_plain(
    config: TrialConfig, data: Dataset, report: Report | None = None, *, feed: str = "tensor"
) -> PlainResult:
    """Train one trial with the plain loop; ``report`` is called every epoch with val_accuracy."""
    if feed not in ("tensor", "dataloader"):
        raise ValueError(f"feed must be tensor or dataloader, got {feed!r}")
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = build_mlp(config, data.n_features, data.n_classes)
    optimizer = build_optimizer(config, model)
    x_train, y_train, x_val, y_val = data.X_train, data.y_train, data.X_val, data.y_val
    n, batch = len(x_train), config.batch_size
    loader = None
    if feed == "dataloader":
        loader = DataLoader(
            TensorDataset(x_train, y_train), batch_size=batch, shuffle=True, generator=generator
        )
    result = PlainResult(metrics={})
    for epoch in range(config.max_epochs):
        lr = lr_at(config.lr, config.lr_decay, config.lr_decay_rate, config.lr_decay_steps, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        loss_sum = torch.zeros(())
        batches: Iterator[tuple[torch.Tensor, ...]]
        if loader is None:
            order = torch.randperm(n, generator=generator)
            batches = ((x_train[i], y_train[i]) for i in (order[s : s + batch] for s in range(0, n, batch)))
        else:
            batches = iter(loader)
        for xb, yb in batches:
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.l1 > 0:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.add_(p.detach().sign(), alpha=config.l1)
            optimizer.step()
            loss_sum += loss.detach() * len(yb)
        model.eval()
        with torch.no_grad():
            logits = model(x_val)
            val_loss = F.cross_entropy(logits, y_val)
            val_acc = (logits.argmax(dim=1) == y_val).float().mean()
        train_loss, val_loss_f, val_acc_f = torch.stack([loss_sum / n, val_loss, val_acc]).tolist()
        record = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": train_loss,
            "val_loss": val_loss_f,
            "val_accuracy": val_acc_f,
        }
        result.history.append(record)
        result.epochs = epoch + 1
        result.metrics = {k: record[k] for k in ("val_accuracy", "val_loss", "train_loss")}
        if not math.isfinite(train_loss):
            break
        if report is not None and report(epoch, val_acc_f):
            result.pruned = True
            break
    result.seconds = time.perf_counter() - start
    return result
