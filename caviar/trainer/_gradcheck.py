"""Numerical gradient check of the fused layers (float64, two-sided differences)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._layers import build_model

__all__ = ["THRESHOLD", "gradcheck"]

THRESHOLD = 1e-7
"""Largest acceptable relative difference."""

_STEP = 1e-6


def gradcheck(model: str = "mlp", k: int = 3, seed: int = 0) -> dict[str, float]:
    """Compare autograd gradients of a small fused group with central differences.

    Two float64 groups with random weights are checked in training mode with dropout off: one
    without batch norm (keys such as ``"layers.0.weight"``, ``"layers.0.bias"``, ``"head.weight"``)
    and one with batch norm using batch statistics (keys prefixed ``"bn."``, e.g.
    ``"bn.norms.0.weight"``; its hidden layers have no bias). The loss is the sum over members of
    the mean cross-entropy, as in training.

    Args:
        model: ``"mlp"`` (FusedLinear, FusedBatchNorm) or ``"cnn"`` (FusedConv2d, FusedBatchNorm,
            FusedLinear head).
        k: Number of members.
        seed: Seed of the weights and data.

    Returns:
        ``||g_num - g|| / (||g_num|| + ||g||)`` per parameter tensor; each should be below
        :data:`THRESHOLD`.

    Raises:
        ValueError: Unknown model.
    """
    if model not in ("mlp", "cnn"):
        raise ValueError(f"model must be 'mlp' or 'cnn', got {model!r}")
    result = _check(model, k, seed, batch_norm=False, prefix="")
    result.update(_check(model, k, seed + 1, batch_norm=True, prefix="bn."))
    return result


def _check(model: str, k: int, seed: int, batch_norm: bool, prefix: str) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    batch, n_classes = 6, 3
    image_shape = (2, 4, 4) if model == "cnn" else None
    n_features = 32 if model == "cnn" else 5
    net = build_model(model, k, n_features, n_classes, image_shape, 2, 3, batch_norm).double().train()
    with torch.no_grad():
        for name, p in net.named_parameters():
            offset = 1.0 if name.startswith("norms.") and name.endswith(".weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5 + offset)
    x = torch.randn(k, batch, n_features, generator=gen, dtype=torch.float64)
    y = torch.randint(0, n_classes, (k, batch), generator=gen)
    running = {name: b.clone() for name, b in net.named_buffers()}

    def loss() -> torch.Tensor:
        logits = net(x)
        per_sample = F.cross_entropy(logits.reshape(-1, n_classes), y.reshape(-1), reduction="none")
        return per_sample.view(k, -1).mean(dim=1).sum()

    loss().backward()
    result: dict[str, float] = {}
    with torch.no_grad():
        for name, p in net.named_parameters():
            assert p.grad is not None
            analytic = p.grad.detach().clone()
            numeric = torch.zeros_like(p)
            flat, num = p.view(-1), numeric.view(-1)
            for i in range(flat.numel()):
                original = flat[i].item()
                flat[i] = original + _STEP
                plus = loss().item()
                flat[i] = original - _STEP
                minus = loss().item()
                flat[i] = original
                num[i] = (plus - minus) / (2 * _STEP)
            denom = (numeric.norm() + analytic.norm()).item()
            result[prefix + name] = (numeric - analytic).norm().item() / denom if denom > 0 else 0.0
        for name, b in net.named_buffers():
            b.copy_(running[name])
    return result
