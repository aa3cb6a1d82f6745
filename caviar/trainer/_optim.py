"""Fused optimizers: one update for all members, with per-member coefficient tensors.

Every hyperparameter is a ``(K,)`` tensor viewed as ``(K, 1, ...)`` so it broadcasts over each
``(K, ...)`` parameter; the update is a handful of ``torch._foreach_*`` calls over the parameter
list, with no loop over members.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["COEFFICIENTS", "FusedOptimizer"]

COEFFICIENTS = ("lr", "momentum", "beta1", "beta2", "eps", "weight_decay", "l1")

_STATE = {
    "sgd": (),
    "momentum": ("momentum_buffer",),
    "rmsprop": ("square_avg",),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
}


class FusedOptimizer:
    """SGD, heavy-ball momentum, RMSProp, Adam or AdamW over stacked parameters.

    Updates per member (``g`` the gradient, ``t`` the 1-based step):

    * regularisation: ``g += l1 * sign(w)``; ``g += weight_decay * w`` (not for ``adamw``)
    * ``sgd``: ``w -= lr * g``
    * ``momentum``: ``b = momentum * b + g``; ``w -= lr * b``
    * ``rmsprop``: ``s = beta2 * s + (1 - beta2) * g^2``; ``w -= lr * g / (sqrt(s) + eps)``
    * ``adam``: ``m = beta1 * m + (1 - beta1) * g``; ``v = beta2 * v + (1 - beta2) * g^2``;
      ``w -= lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)``
    * ``adamw``: ``w *= 1 - lr * weight_decay`` and then the Adam step.

    Args:
        params: Parameters, each with the member axis first.
        kind: Optimizer name.
        coefficients: ``(K,)`` values (sequences or tensors) for each name in :data:`COEFFICIENTS`.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        kind: str,
        coefficients: Mapping[str, Sequence[float] | torch.Tensor],
    ) -> None:
        if kind not in _STATE:
            raise ValueError(f"optimizer must be one of {', '.join(_STATE)}, got {kind!r}")
        self.params = list(params)
        self.kind = kind
        ref = self.params[0]
        self.coef = {
            name: torch.as_tensor(coefficients[name], dtype=torch.float64).to(ref.device)
            for name in COEFFICIENTS
        }
        self.lr = self.coef["lr"].clone()
        self.state = {name: [torch.zeros_like(p) for p in self.params] for name in _STATE[kind]}
        # per member: members that join a running group (refill) start their own count
        self.steps = torch.zeros(len(self.lr), dtype=torch.float64, device=ref.device)
        self._refresh()

    def _refresh(self) -> None:
        """Recompute the cached broadcast views and the host-side flags (after lr or K changes)."""
        self._has_l1 = bool((self.coef["l1"] > 0).any())
        self._has_wd = bool((self.coef["weight_decay"] > 0).any())
        c = self.coef
        self._v = {
            "l1": self._views(c["l1"]),
            "wd": self._views(c["weight_decay"]),
            "lr": self._views(self.lr),
            "momentum": self._views(c["momentum"]),
            "beta1": self._views(c["beta1"]),
            "one_minus_beta1": self._views(1.0 - c["beta1"]),
            "beta2": self._views(c["beta2"]),
            "one_minus_beta2": self._views(1.0 - c["beta2"]),
            "eps": self._views(c["eps"]),
            "decay": self._views(1.0 - self.lr * c["weight_decay"]),
        }

    def _views(self, values: torch.Tensor) -> list[torch.Tensor]:
        values = values.to(self.params[0].dtype)
        return [values.view((-1,) + (1,) * (p.dim() - 1)) for p in self.params]

    def set_lr(self, lr: Sequence[float] | torch.Tensor) -> None:
        """Set the current (scheduled) learning rate of every member."""
        self.lr = torch.as_tensor(lr, dtype=torch.float64).to(self.coef["lr"].device)
        self._refresh()

    def zero_grad(self) -> None:
        """Drop the gradients (``set_to_none`` semantics)."""
        for p in self.params:
            p.grad = None

    def select(self, index: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        """Keep only the members at ``index`` in coefficients and state.

        Args:
            index: Slots to keep, in order.
            params: The compacted parameters (same order as before) that the optimizer updates from now on.
        """
        self.params = list(params)
        self.coef = {name: t.index_select(0, index) for name, t in self.coef.items()}
        self.lr = self.lr.index_select(0, index)
        self.state = {name: [t.index_select(0, index) for t in ts] for name, ts in self.state.items()}
        self.steps = self.steps.index_select(0, index)
        self._refresh()

    def extend(self, other: FusedOptimizer, params: Sequence[torch.Tensor]) -> None:
        """Append ``other``'s members (coefficients, state, step counts) after this optimizer's.

        Args:
            other: An optimizer of the same kind over the new members' parameters.
            params: The concatenated parameters (same order as before) updated from now on.
        """
        if other.kind != self.kind:
            raise ValueError(f"optimizer must be {self.kind!r} to join this group, got {other.kind!r}")
        self.params = list(params)
        self.coef = {name: torch.cat([t, other.coef[name]]) for name, t in self.coef.items()}
        self.lr = torch.cat([self.lr, other.lr])
        self.state = {
            name: [torch.cat([a, b]) for a, b in zip(ts, other.state[name], strict=True)]
            for name, ts in self.state.items()
        }
        self.steps = torch.cat([self.steps, other.steps])
        self._refresh()

    @torch.no_grad()
    def copy_member(self, slot: int, source: int, coefficients: Mapping[str, float]) -> None:
        """Give member ``slot`` a copy of member ``source``'s state (moments, step count) and new
        ``coefficients`` (population-based training's exploit and explore).

        Args:
            slot: The member that copies.
            source: The member copied.
            coefficients: ``slot``'s new value for each name in :data:`COEFFICIENTS`.
        """
        for tensors in self.state.values():
            for t in tensors:
                t[slot].copy_(t[source])
        self.steps[slot] = self.steps[source]
        for name in COEFFICIENTS:
            self.coef[name][slot] = float(coefficients[name])
        self._refresh()

    @torch.no_grad()
    def step(self) -> None:
        """Apply one update to all members."""
        params = self.params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        v = self._v
        self.steps += 1
        if self._has_l1:
            torch._foreach_addcmul_(grads, torch._foreach_sign(params), v["l1"])
        if self._has_wd and self.kind != "adamw":
            torch._foreach_addcmul_(grads, params, v["wd"])
        if self.kind == "sgd":
            torch._foreach_sub_(params, torch._foreach_mul(grads, v["lr"]))
        elif self.kind == "momentum":
            buf = self.state["momentum_buffer"]
            torch._foreach_mul_(buf, v["momentum"])
            torch._foreach_add_(buf, grads)
            torch._foreach_sub_(params, torch._foreach_mul(buf, v["lr"]))
        elif self.kind == "rmsprop":
            sq = self.state["square_avg"]
            torch._foreach_mul_(sq, v["beta2"])
            torch._foreach_addcmul_(sq, grads, torch._foreach_mul(grads, v["one_minus_beta2"]))
            denom = torch._foreach_sqrt(sq)
            torch._foreach_add_(denom, v["eps"])
            update = torch._foreach_div(grads, denom)
            torch._foreach_mul_(update, v["lr"])
            torch._foreach_sub_(params, update)
        else:
            if self.kind == "adamw" and self._has_wd:
                torch._foreach_mul_(params, v["decay"])
            m, s = self.state["exp_avg"], self.state["exp_avg_sq"]
            torch._foreach_lerp_(m, grads, v["one_minus_beta1"])
            torch._foreach_lerp_(s, torch._foreach_mul(grads, grads), v["one_minus_beta2"])
            # w -= m / ((sqrt(s) / sqrt(bc2) + eps) / step_size), step_size = lr / bc1: three passes.
            c = self.coef
            step_size = self.lr / (1.0 - c["beta1"] ** self.steps)
            root_scale = self._views(torch.rsqrt(1.0 - c["beta2"] ** self.steps) / step_size)
            denom = torch._foreach_sqrt(s)
            denom = torch._foreach_addcmul(self._views(c["eps"] / step_size), denom, root_scale)
            torch._foreach_addcdiv_(params, m, denom, value=-1.0)
