"""Fusing K same-architecture copies of a user's own ``nn.Module`` (HFTA-style, with ``torch.func``).

:class:`FusedModels` stacks the members' parameters and buffers along a leading axis of size K
(``torch.func.stack_module_state``) and runs the module once for all of them
(``torch.func.functional_call`` under ``torch.func.vmap``), so K trials of the same architecture
train as one: one forward, one backward (of the sum of the members' losses, which gives each
member exactly its own gradients), one optimizer step over the stacked tensors
(:class:`MemberOptimizer`: SGD, momentum, Adam or AdamW with each hyperparameter a ``(K,)`` tensor).

Each member keeps what a solo run has: its own initialisation, batch-norm running statistics
(stacked buffers, updated in place per member), dropout masks (``randomness="different"``),
optimizer state and bias-correction step count. A member can be dropped (pruned: it stops updating)
and its place refilled with a new model (its optimizer state starts afresh); any member's weights
come back out as an ordinary ``state_dict`` (:meth:`FusedModels.state_dict`).

Everything here is plain PyTorch: it imports nothing of caviar's service or worker.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ._optim import FusedOptimizer

__all__ = ["FusedModels", "MemberOptimizer", "fused"]

Values = float | Sequence[float] | torch.Tensor
"""A hyperparameter: one value for every member, or one per member."""


def _per_member(value: Values, k: int, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64).flatten()
    if tensor.numel() == 1:
        return tensor.expand(k).clone()
    if tensor.numel() != k:
        raise ValueError(f"{name}: one value or {k} (one per member), got {tensor.numel()}")
    return tensor.clone()


class FusedModels:
    """K members of one architecture, trained as one stacked model.

    Args:
        models: the members (same architecture: same parameter and buffer names and shapes), e.g.
            ``[Net(hidden=64) for _ in range(8)]``; their current weights are each member's
            initialisation. They are copied: the modules given are left as they are.
        device: where the stacked tensors live (default: where the first model's are).

    Example::

        fused = FusedModels([Net() for _ in range(8)])
        optimizer = fused.optimizer("adam", lr=[1e-3, 3e-3, ...], betas=(0.9, 0.999))
        out = fused(x)          # x (B, ...) shared; fused(x, shared=False) for x (K, B, ...)
        losses = fused.losses(F.cross_entropy, out, y)  # (K,): each member's own loss
        optimizer.zero_grad()
        losses.sum().backward()
        optimizer.step()
    """

    def __init__(self, models: Sequence[nn.Module], *, device: torch.device | str | None = None) -> None:
        if not models:
            raise ValueError("FusedModels needs at least one model")
        names = [sorted(m.state_dict()) for m in models]
        if any(n != names[0] for n in names):
            raise ValueError("FusedModels: the models differ in their parameters or buffers")
        if device is not None:
            models = [copy.deepcopy(m).to(device) for m in models]
        params, buffers = stack_module_state(list(models))  # copies: leaves of shape (K, ...)
        self.params: dict[str, torch.Tensor] = params
        self.buffers: dict[str, torch.Tensor] = buffers
        self._template = copy.deepcopy(models[0])  # holds the architecture and the train/eval mode
        self._base = copy.deepcopy(models[0]).to("meta")  # no storage: run with the stacked tensors
        self._base.train(models[0].training)
        self.active = torch.ones(len(models), dtype=torch.bool)
        self._optimizers: list[MemberOptimizer] = []

    # ---- the members -------------------------------------------------------------------

    @property
    def k(self) -> int:
        """The number of members (places, dropped ones included)."""
        return int(self.active.numel())

    @property
    def training(self) -> bool:
        return bool(self._base.training)

    def train(self, mode: bool = True) -> FusedModels:
        """Training mode for every member (dropout on, batch norm uses and updates batch statistics)."""
        self._base.train(mode)
        return self

    def eval(self) -> FusedModels:
        """Evaluation mode for every member."""
        return self.train(False)

    def parameters(self) -> list[torch.Tensor]:
        """The stacked parameters, each ``(K, ...)``."""
        return list(self.params.values())

    def forward(self, x: torch.Tensor, *args: Any, shared: bool = True) -> torch.Tensor:
        """Run every member on ``x``: ``(B, ...)`` shared by all, or, with ``shared=False``,
        ``(K, B, ...)``, one batch per member.

        Args:
            x: the input.
            args: further inputs, shared by all members.
            shared: whether every member gets the same ``x``.

        Returns:
            The members' outputs stacked: ``(K, ...)``.
        """
        if not shared and (x.dim() == 0 or x.shape[0] != self.k):
            raise ValueError(f"forward(shared=False): the input's first axis must be K = {self.k}")
        base = self._base

        def member(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
            return functional_call(base, (params, buffers), (x, *args))

        run = vmap(member, in_dims=(0, 0, None if shared else 0), randomness="different")
        return run(self.params, self.buffers, x)

    __call__ = forward

    def losses(
        self,
        loss_fn: Callable[..., torch.Tensor],
        output: torch.Tensor,
        target: torch.Tensor,
        *,
        shared: bool | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Each member's loss, ``(K,)``: ``loss_fn(output[k], target[k], **kwargs)``, or
        ``loss_fn(output[k], target, **kwargs)`` when ``target`` is shared by all members.

        ``target`` is taken as one per member when ``shared`` says so or, by default, when its shape
        is the output's (``(K, B, 1)`` for ``(K, B, 1)``) or the output's without its last axis
        (``(K, B)`` class labels for ``(K, B, C)`` logits). A dropped member's loss is zero, so
        ``losses.sum().backward()`` leaves its gradients zero.
        """
        if shared is None:
            shared = target.shape not in (output.shape, output.shape[:-1])
        values = vmap(
            lambda out, tgt: loss_fn(out, tgt, **kwargs),
            in_dims=(0, None if shared else 0),
            randomness="different",
        )(output, target)
        if bool(self.active.all()):
            return values
        return values * self.active.to(values.device, values.dtype)

    def state_dict(self, member: int) -> dict[str, torch.Tensor]:
        """Member ``member``'s weights as the ``state_dict`` of one model (copies, detached)."""
        self._check(member)
        found = {name: t[member].detach().clone() for name, t in {**self.params, **self.buffers}.items()}
        return {name: found[name] for name in self._template.state_dict() if name in found}

    def model(self, member: int) -> nn.Module:
        """A standalone model with member ``member``'s weights (in the fused models' mode)."""
        model = copy.deepcopy(self._template)
        model.load_state_dict(self.state_dict(member))
        return model.train(self.training)

    def load_member(self, member: int, source: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Put ``source`` (a model, or its ``state_dict``) in place ``member``, active; every
        optimizer of these models starts that member afresh (no moments, step count 0)."""
        self._check(member)
        state = source.state_dict() if isinstance(source, nn.Module) else source
        missing = (set(self.params) | set(self.buffers)) - set(state)
        if missing:
            raise ValueError(f"load_member: the state lacks {sorted(missing)[0]!r}")
        with torch.no_grad():
            for name, tensor in {**self.params, **self.buffers}.items():
                tensor[member].copy_(state[name])
                if tensor.grad is not None:
                    tensor.grad[member].zero_()
        self.active[member] = True
        for optimizer in self._optimizers:
            optimizer.restart(member)

    def drop(self, member: int) -> None:
        """Stop training member ``member`` (pruned): its loss counts zero and its weights, buffers
        and optimizer state no longer change. Its place may be refilled (:meth:`load_member`)."""
        self._check(member)
        self.active[member] = False

    def _check(self, member: int) -> None:
        if not 0 <= member < self.k:
            raise IndexError(f"member {member} of {self.k}")

    # ---- the optimizer -----------------------------------------------------------------

    def optimizer(
        self,
        kind: str = "adam",
        *,
        lr: Values = 1e-3,
        betas: tuple[Values, Values] = (0.9, 0.999),
        eps: Values = 1e-8,
        weight_decay: Values = 0.0,
        momentum: Values = 0.0,
    ) -> MemberOptimizer:
        """An optimizer over the stacked parameters, each hyperparameter one value or K.

        Args:
            kind: ``adam`` (``torch.optim.Adam``: L2 ``weight_decay`` added to the gradient),
                ``adamw`` (``torch.optim.AdamW``: decoupled), or ``sgd`` (``torch.optim.SGD``, with
                ``momentum`` when any member has some; no dampening, no Nesterov).
            lr: learning rates.
            betas: Adam's ``(beta1, beta2)``.
            eps: Adam's epsilon.
            weight_decay: weight decay.
            momentum: SGD momentum.
        """
        optimizer = MemberOptimizer(
            self, kind, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum
        )
        self._optimizers.append(optimizer)
        return optimizer


class MemberOptimizer:
    """Per-member SGD/momentum/Adam/AdamW over :class:`FusedModels`' stacked parameters.

    Each member is updated exactly as ``torch.optim`` updates a solo model with its
    hyperparameters (bias correction with its own step count); dropped members are left as they are.
    Change a member's hyperparameters with :meth:`set` (e.g. a schedule, or a refilled member's).
    """

    def __init__(
        self,
        models: FusedModels,
        kind: str,
        *,
        lr: Values,
        betas: tuple[Values, Values],
        eps: Values,
        weight_decay: Values,
        momentum: Values,
    ) -> None:
        if kind not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer must be adam, adamw or sgd, got {kind!r}")
        k = models.k
        coefficients = {
            "lr": _per_member(lr, k, "lr"),
            "beta1": _per_member(betas[0], k, "betas[0]"),
            "beta2": _per_member(betas[1], k, "betas[1]"),
            "eps": _per_member(eps, k, "eps"),
            "weight_decay": _per_member(weight_decay, k, "weight_decay"),
            "momentum": _per_member(momentum, k, "momentum"),
            "l1": torch.zeros(k, dtype=torch.float64),
        }
        if kind == "sgd" and bool((coefficients["momentum"] > 0).any()):
            kind = "momentum"
        self.models = models
        self._fused = FusedOptimizer(models.parameters(), kind, coefficients)

    @property
    def lr(self) -> torch.Tensor:
        """The members' current learning rates, ``(K,)``."""
        return self._fused.lr

    def set(self, member: int, **values: float) -> None:
        """Change member ``member``'s hyperparameters (``lr``, ``beta1``, ``beta2``, ``eps``,
        ``weight_decay``, ``momentum``)."""
        fused = self._fused
        for name, value in values.items():
            if name not in fused.coef or name == "l1":
                raise ValueError(f"set: unknown hyperparameter {name!r}")
            if name == "momentum" and fused.kind == "sgd" and value:
                raise ValueError("set: momentum on an optimizer made without momentum")
            fused.coef[name][member] = float(value)
            if name == "lr":
                fused.lr[member] = float(value)
        fused._refresh()

    def restart(self, member: int) -> None:
        """Start member ``member`` afresh: no moments, step count 0 (a refilled place)."""
        fused = self._fused
        with torch.no_grad():
            for tensors in fused.state.values():
                for tensor in tensors:
                    tensor[member].zero_()
        fused.steps[member] = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (or zero them, with ``set_to_none=False``), as ``torch.optim`` does."""
        if set_to_none:
            self._fused.zero_grad()
            return
        for p in self._fused.params:
            if p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every active member."""
        active = self.models.active
        fused = self._fused
        if bool(active.all()):
            fused.step()
            return
        # dropped members keep their weights, moments and step count (momentum would move them)
        keep = (~active).nonzero().flatten().to(fused.params[0].device)
        saved = [p.index_select(0, keep) for p in fused.params]
        state = {name: [t.index_select(0, keep) for t in ts] for name, ts in fused.state.items()}
        steps = fused.steps.index_select(0, keep.to(fused.steps.device))
        fused.step()
        for p, s in zip(fused.params, saved, strict=True):
            p.index_copy_(0, keep, s)
        for name, ts in fused.state.items():
            for t, s in zip(ts, state[name], strict=True):
                t.index_copy_(0, keep, s)
        fused.steps.index_copy_(0, keep.to(fused.steps.device), steps)


def fused(
    model_fn: Callable[[], nn.Module], k: int, *, device: torch.device | str | None = None
) -> FusedModels:
    """K members built by ``model_fn()`` (each call its own initialisation), fused.

    For members that must match solo runs seeded one by one, build them yourself and pass the list
    to :class:`FusedModels`.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return FusedModels([model_fn() for _ in range(k)], device=device)
