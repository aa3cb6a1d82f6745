"""The fused training loop: K members trained as one stacked model.

:func:`train` is :func:`train_group` with a single member, so both share one code path.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ._checkpoint import save_checkpoint
from ._data import Dataset
from ._layers import FusedModel, build_model
from ._optim import COEFFICIENTS, FusedOptimizer
from ._pbt import Population
from ._rng import (
    STREAM_AUGMENT,
    STREAM_DROPOUT,
    STREAM_SHUFFLE,
    member_generators,
    normal,
    permutations,
    uniform,
)
from .spec import METRICS, TrialConfig, check_group, lr_at

__all__ = [
    "EpochReport",
    "GroupReport",
    "Interrupted",
    "Report",
    "TrialResult",
    "augment_batch",
    "resolve_device",
    "train",
    "train_group",
]


class Interrupted(Exception):
    """Raised by :func:`train_group` when its ``interrupt`` event is set (checked every mini-batch)."""


Report = Callable[[int, float], bool]
"""``report(step, val_accuracy) -> prune?`` for :func:`train`."""
GroupReport = Callable[[int, int, float], bool]
"""``report(member_index, step, val_accuracy) -> prune?`` for :func:`train_group`."""
EpochReport = Callable[[list[tuple[int, int, float]]], Collection[int]]
"""``report_epoch([(member_index, step, value), ...]) -> members to prune`` for :func:`train_group`."""

_EVAL_CHUNK = 4096


@dataclass
class TrialResult:
    """Outcome of one trained member.

    Attributes:
        config: The member's config.
        metrics: ``val_accuracy``, ``val_loss`` and ``train_loss`` of the returned weights: the best
            (lowest validation loss) epoch when early stopping is on (``patience > 0``), else the
            last epoch run.
        history: One dict per epoch run: ``epoch`` (0-based), ``lr``, ``train_loss``, ``val_loss``,
            ``val_accuracy``.
        pruned: Whether ``report`` asked to prune it.
        epochs: Number of epochs run.
        best_epoch: Epoch whose metrics and weights are returned.
        seconds: Wall time from the member joining its group until it left it.
    """

    config: TrialConfig
    metrics: dict[str, float]
    history: list[dict[str, float]]
    pruned: bool
    epochs: int
    best_epoch: int
    seconds: float
    _state: dict[str, torch.Tensor] = field(repr=False)
    _meta: dict[str, Any] = field(repr=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The member's trained parameters and buffers (no member axis), as CPU tensors."""
        return {name: t.clone() for name, t in self._state.items()}

    def save(self, path: str | Path) -> None:
        """Save a checkpoint that :func:`trainer.load_model` rebuilds for inference."""
        save_checkpoint(path, self.config, self._state, self._meta)


def resolve_device(device: str) -> torch.device:
    """Map a config's device string to a torch device (``"auto"``: CUDA when available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def augment_batch(
    x: torch.Tensor,
    strength: torch.Tensor,
    gens: Sequence[torch.Generator],
    image_shape: tuple[int, int, int] | None,
) -> torch.Tensor:
    """Training-time augmentation with per-member strength and noise.

    Image data is first shifted by up to ``ceil(strength)`` pixels per axis (zero fill, i.e. the
    training mean after normalisation); all data then gets Gaussian noise of std ``strength``.
    A member with strength 0 is left exactly unchanged.

    Args:
        x: ``(K, B, n_features)`` normalised inputs.
        strength: ``(K,)`` augmentation strengths.
        gens: One generator per member (its augmentation stream).
        image_shape: ``(C, H, W)`` or ``None``.

    Returns:
        The augmented batch, same shape.
    """
    k, b, n = x.shape
    if image_shape is not None:
        c, h, w = image_shape
        radius = torch.ceil(strength).view(k, 1, 1)
        u = uniform(gens, (2, b), x.device)
        shift = (torch.floor(u * (2 * radius + 1)) - radius).to(torch.int64)
        rows = torch.arange(h, device=x.device) - shift[:, 0, :, None]
        cols = torch.arange(w, device=x.device) - shift[:, 1, :, None]
        valid = ((rows >= 0) & (rows < h))[..., :, None] & ((cols >= 0) & (cols < w))[..., None, :]
        index = rows.clamp(0, h - 1)[..., :, None] * w + cols.clamp(0, w - 1)[..., None, :]
        src = x.view(k, b, c, h * w)
        x = torch.gather(src, 3, index.view(k, b, 1, h * w).expand(k, b, c, h * w))
        x = (x * valid.view(k, b, 1, h * w).to(x.dtype)).view(k, b, n)
    noise = normal(gens, (b, n), x.device)
    return x + noise * strength.view(k, 1, 1).to(x.dtype)


def train(
    config: TrialConfig, data: Dataset, report: Report | None = None, *, metric: str = "val_accuracy"
) -> TrialResult:
    """Train one config: :func:`train_group` with a single member.

    Args:
        config: The trial's hyperparameters.
        data: The dataset.
        report: Called after every epoch as ``report(epoch, value)``; ``True`` prunes.
        metric: The reported value: ``val_accuracy``, ``val_loss`` or ``train_loss``.

    Returns:
        The trial's result.
    """
    group_report: GroupReport | None = None
    if report is not None:
        single = report

        def group_report(_member: int, step: int, value: float) -> bool:
            return single(step, value)

    return train_group([config], data, group_report, metric=metric)[0]


class _Group:
    """Mutable state of the live members of a group (all stacked along the member axis)."""

    def __init__(self, configs: Sequence[TrialConfig], data: Dataset, device: torch.device) -> None:
        shared = configs[0]
        self.configs = list(configs)
        self.device = device
        self.model: FusedModel = build_model(
            shared.model,
            len(configs),
            data.n_features,
            data.n_classes,
            data.image_shape,
            shared.layers,
            shared.hidden_units,
            shared.batch_norm,
        )
        self.model.init_members([c.seed for c in configs], shared.init)
        self.model.to(device)
        self.optimizer = FusedOptimizer(
            list(self.model.parameters()),
            shared.optimizer,
            {name: [float(getattr(c, name)) for c in configs] for name in COEFFICIENTS},
        )
        self.members = list(range(len(configs)))  # original index of each live slot
        self.first_epoch = [0] * len(configs)  # group epoch at which each member joined
        seeds = [c.seed for c in configs]
        self.rng = {
            stream: member_generators(seeds, stream, device)
            for stream in (STREAM_SHUFFLE, STREAM_DROPOUT, STREAM_AUGMENT)
        }
        self.dropout = torch.tensor([c.dropout for c in configs], dtype=torch.float32, device=device)
        self.augment = torch.tensor([c.augment for c in configs], dtype=torch.float32, device=device)
        self.best: list[torch.Tensor] | None = None
        if shared.patience > 0:
            self.best = [t.detach().clone() for t in self.model.state_dict().values()]

    @property
    def any_dropout(self) -> bool:
        return any(self.configs[m].dropout > 0 for m in self.members)

    @property
    def any_augment(self) -> bool:
        return any(self.configs[m].augment > 0 for m in self.members)

    def set_epoch_lr(self, epoch: int) -> None:
        """Each member's scheduled learning rate at its own epoch (members may join later)."""
        lrs = [
            lr_at(c.lr, c.lr_decay, c.lr_decay_rate, c.lr_decay_steps, epoch - self.first_epoch[m])
            for m, c in ((m, self.configs[m]) for m in self.members)
        ]
        self.optimizer.set_lr(lrs)

    def restart(self, configs: Sequence[TrialConfig], data: Dataset, epoch: int) -> _Group:
        """A group of only new members (every current one left), keeping member numbering."""
        fresh = _Group(configs, data, self.device)
        offset = len(self.configs)
        fresh.configs = [*self.configs, *configs]
        fresh.members = [offset + i for i in range(len(configs))]
        fresh.first_epoch = [*self.first_epoch, *([epoch] * len(configs))]
        return fresh

    def extend(self, configs: Sequence[TrialConfig], data: Dataset, epoch: int) -> None:
        """Add freshly initialised members that start their own epoch 0 at group epoch ``epoch``."""
        new = _Group(configs, data, self.device)
        self.model.extend(new.model)
        self.optimizer.extend(new.optimizer, list(self.model.parameters()))
        offset = len(self.configs)
        self.configs.extend(configs)
        self.members.extend(offset + i for i in range(len(configs)))
        self.first_epoch.extend([epoch] * len(configs))
        self.rng = {stream: gens + new.rng[stream] for stream, gens in self.rng.items()}
        self.dropout = torch.cat([self.dropout, new.dropout])
        self.augment = torch.cat([self.augment, new.augment])
        if self.best is not None and new.best is not None:
            self.best = [torch.cat([a, b]) for a, b in zip(self.best, new.best, strict=True)]

    def keep_best(self, improved: list[bool]) -> None:
        """Copy the current weights of improved slots into the best-epoch snapshot."""
        if self.best is None or not any(improved):
            return
        mask = torch.tensor(improved, device=self.device)
        with torch.no_grad():
            for best, current in zip(self.best, self.model.state_dict().values(), strict=True):
                best.copy_(torch.where(mask.view((-1,) + (1,) * (best.dim() - 1)), current, best))

    def member_state(self, slot: int, restore_best: bool) -> dict[str, torch.Tensor]:
        if restore_best and self.best is not None:
            names = self.model.state_dict().keys()
            return {name: t[slot].to("cpu", copy=True) for name, t in zip(names, self.best, strict=True)}
        return self.model.member_state(slot)

    @torch.no_grad()
    def clone(self, slot: int, source: int, config: TrialConfig) -> None:
        """PBT's exploit: ``slot`` takes ``source``'s parameters, buffers (batch-norm statistics),
        optimizer state and step count in place, and ``config``'s fusible hyperparameters."""
        for t in self.model.state_dict().values():
            t[slot].copy_(t[source])
        self.optimizer.copy_member(
            slot, source, {name: float(getattr(config, name)) for name in COEFFICIENTS}
        )
        self.dropout[slot] = config.dropout
        self.augment[slot] = config.augment
        self.configs[self.members[slot]] = config

    def exploit(
        self, population: Population, slots: list[int], epoch: int, scores: list[float], metric: str
    ) -> None:
        """PBT's exploit/explore step over the live ``slots`` that go on training (their ``scores``)."""
        members = [self.members[s] for s in slots]
        plans = population.plan(
            members,
            [epoch + 1 - self.first_epoch[m] for m in members],
            scores,
            [self.configs[m] for m in members],
            higher_is_better=metric == "val_accuracy"
            if population.config.maximize is None
            else population.config.maximize,
        )
        for position, parent, config, event in plans:
            self.clone(slots[position], slots[parent], config)
            if population.on_exploit is not None:
                population.on_exploit(event)

    def keep(self, slots: list[int]) -> None:
        """Compact the group to the given slots (parameters, buffers, optimizer state, coefficients)."""
        index = torch.tensor(slots, dtype=torch.int64, device=self.device)
        self.model.select(index)
        self.optimizer.select(index, list(self.model.parameters()))
        self.members = [self.members[s] for s in slots]
        self.rng = {stream: [gens[s] for s in slots] for stream, gens in self.rng.items()}
        self.dropout = self.dropout.index_select(0, index)
        self.augment = self.augment.index_select(0, index)
        if self.best is not None:
            self.best = [t.index_select(0, index) for t in self.best]


def train_group(
    configs: Sequence[TrialConfig],
    data: Dataset,
    report: GroupReport | None = None,
    *,
    metric: str = "val_accuracy",
    on_result: Callable[[int, TrialResult], None] | None = None,
    refill: Callable[[int], Sequence[TrialConfig]] | None = None,
    interrupt: threading.Event | None = None,
    report_epoch: EpochReport | None = None,
    population: Population | None = None,
) -> list[TrialResult]:
    """Train K configs as one fused group; member ``k`` behaves as ``train(configs[k])`` alone.

    Members differ only in :data:`trainer.FUSIBLE` fields. Every epoch each live member is
    evaluated and reported as ``report(member_index, epoch, value)`` (``value`` is ``metric``); a
    ``True`` answer prunes it. Pruned and early-stopped members leave the group (the stacks are
    compacted).

    Args:
        configs: The members' configs.
        data: The dataset.
        report: Optional pruning callback.
        metric: The reported value: ``val_accuracy``, ``val_loss`` or ``train_loss``.
        on_result: Called as ``on_result(member_index, result)`` the moment a member leaves the
            group (pruned, early-stopped or done), so a caller can record it before the rest finish.
        refill: Called as ``refill(free)`` after an epoch in which members left, with the number
            of free places (the group's initial size minus the live members); the configs it
            returns join the group as new members (indices continue after ``configs``) and train
            their own ``max_epochs`` from their own epoch 0, exactly as if trained alone.
        interrupt: When set, training stops at the next mini-batch with :class:`Interrupted` (a
            stopping worker hands its trials back without waiting for the epoch to end).
        report_epoch: Called once per epoch with every live member's ``(member_index, step,
            value)``, before ``report``; the members it returns are pruned. It sees the group's
            members side by side (e.g. to rank those at the same step, as the worker's ASHA does).
        population: Population-based training: after each epoch, the members that go on training
            exploit and explore as its :class:`~caviar.trainer.PBT` settings say (a member's
            config in its result is then its last one).

    Returns:
        One result per config (the refilled ones after ``configs``), in order.

    Raises:
        ValueError: Members that cannot be fused (field named), or a CNN on non-image data.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    check_group(configs)
    shared = configs[0]
    if shared.model == "cnn" and data.image_shape is None:
        raise ValueError(f"model 'cnn' needs an image dataset; {data.name!r} has no image_shape")
    device = resolve_device(shared.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    meta = {
        "n_features": data.n_features,
        "n_classes": data.n_classes,
        "image_shape": data.image_shape,
        "mean": data.mean,
        "std": data.std,
        "classes": data.classes,
    }
    x_train, y_train = data.X_train.to(device), data.y_train.to(device)
    x_val, y_val = data.X_val.to(device), data.y_val.to(device)
    n_train, batch = len(x_train), shared.batch_size
    group = _Group(configs, data, device)
    capacity = len(configs)
    histories: list[list[dict[str, float]]] = [[] for _ in configs]
    best_loss = [math.inf] * len(configs)
    best_epoch = [0] * len(configs)
    stale = [0] * len(configs)
    joined = [start] * len(configs)  # when each member started training (refills join later)
    results: list[TrialResult | None] = [None] * len(configs)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    epoch = -1
    while group.members:
        epoch += 1
        k = len(group.members)
        group.set_epoch_lr(epoch)
        dropout = group.dropout if group.any_dropout else None
        augment = group.any_augment
        order = permutations(group.rng[STREAM_SHUFFLE], n_train, device)
        group.model.train()
        loss_sum = torch.zeros(k, device=device)
        for start_index in range(0, n_train, batch):
            if interrupt is not None and interrupt.is_set():  # a host-side flag: no device sync
                raise Interrupted
            index = order[:, start_index : start_index + batch]
            xb, yb = x_train[index], y_train[index]
            if augment:
                xb = augment_batch(xb, group.augment, group.rng[STREAM_AUGMENT], data.image_shape)
            with autocast:
                logits = group.model(xb, dropout, group.rng[STREAM_DROPOUT])
            losses = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="none"
            ).view(k, -1)
            per_member = losses.mean(dim=1)
            group.optimizer.zero_grad()
            per_member.sum().backward()
            group.optimizer.step()
            loss_sum += per_member.detach() * index.shape[1]
        val_loss, val_acc = _evaluate(group.model, x_val, y_val, autocast)
        # The only host synchronisation of the epoch.
        train_losses, val_losses, val_accs = torch.stack([loss_sum / n_train, val_loss, val_acc]).tolist()
        lrs = group.optimizer.lr.tolist()
        improved = []
        for slot, member in enumerate(group.members):
            histories[member].append(
                {
                    "epoch": epoch - group.first_epoch[member],
                    "lr": lrs[slot],
                    "train_loss": train_losses[slot],
                    "val_loss": val_losses[slot],
                    "val_accuracy": val_accs[slot],
                }
            )
            better = val_losses[slot] < best_loss[member]
            improved.append(better)
            if better:
                best_loss[member], stale[member] = val_losses[slot], 0
                best_epoch[member] = epoch - group.first_epoch[member]
            else:
                stale[member] += 1
        group.keep_best(improved)
        decided: Collection[int] = ()
        if report_epoch is not None:
            decided = report_epoch(
                [(m, epoch - group.first_epoch[m], histories[m][-1][metric]) for m in group.members]
            )
        keep: list[int] = []
        for slot, member in enumerate(group.members):
            own_epoch = epoch - group.first_epoch[member]
            pruned = member in decided or (
                report is not None and bool(report(member, own_epoch, histories[member][-1][metric]))
            )
            stopped = shared.patience > 0 and stale[member] >= shared.patience
            if not (pruned or stopped or own_epoch == shared.max_epochs - 1):
                keep.append(slot)
                continue
            restore = shared.patience > 0 and not pruned
            chosen = best_epoch[member] if restore else own_epoch
            record = histories[member][chosen]
            result = results[member] = TrialResult(
                config=group.configs[member],
                metrics={name: record[name] for name in ("val_accuracy", "val_loss", "train_loss")},
                history=histories[member],
                pruned=pruned,
                epochs=own_epoch + 1,
                best_epoch=chosen,
                seconds=time.perf_counter() - joined[member],
                _state=group.member_state(slot, restore),
                _meta=meta,
            )
            if on_result is not None:
                on_result(member, result)
        if population is not None:  # PBT: exploit/explore among the members that go on
            group.exploit(
                population, keep, epoch, [histories[group.members[s]][-1][metric] for s in keep], metric
            )
        joining: list[TrialConfig] = []
        if refill is not None and len(keep) < capacity:
            joining = list(refill(capacity - len(keep)))[: capacity - len(keep)]
            check_group([shared, *joining])
        if not keep and not joining:
            break
        if not keep:
            group = group.restart(joining, data, epoch + 1)
        else:
            if len(keep) < k:
                group.keep(keep)
            if joining:
                group.extend(joining, data, epoch + 1)
        histories.extend([] for _ in joining)
        best_loss.extend([math.inf] * len(joining))
        best_epoch.extend([0] * len(joining))
        stale.extend([0] * len(joining))
        joined.extend([time.perf_counter()] * len(joining))
        results.extend([None] * len(joining))
    return [r for r in results if r is not None]


@torch.no_grad()
def _evaluate(
    model: FusedModel, x: torch.Tensor, y: torch.Tensor, autocast: contextlib.AbstractContextManager[Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean validation loss and accuracy per member, ``(K,)`` each, kept on the device."""
    model.eval()
    loss = torch.zeros(model.k, device=x.device)
    correct = torch.zeros(model.k, device=x.device)
    for i in range(0, len(x), _EVAL_CHUNK):
        xb, yb = x[i : i + _EVAL_CHUNK], y[i : i + _EVAL_CHUNK]
        with autocast:
            logits = model(xb).float()
        k, n, c = logits.shape
        loss += F.cross_entropy(logits.reshape(-1, c), yb.repeat(k), reduction="none").view(k, n).sum(dim=1)
        correct += (logits.argmax(dim=-1) == yb).sum(dim=1)
    return loss / len(x), correct / len(x)
