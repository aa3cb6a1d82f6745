"""Stateless, counter-based random numbers for fused groups.

Each member's noise is a hash of ``(member seed, stream, counters, element index)``, so it is
independent of how many other members share the group, needs no generator state (nothing to
compact when members leave) and is generated for all members in one vectorised pass.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "STREAM_AUGMENT",
    "STREAM_DROPOUT",
    "STREAM_SHUFFLE",
    "member_keys",
    "normal",
    "random_bits",
    "uniform",
]

STREAM_SHUFFLE = 1
STREAM_DROPOUT = 2
STREAM_AUGMENT = 3

_M32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """32-bit integer finaliser on int64 tensors holding values in ``[0, 2**32)``.

    Multipliers are below ``2**31`` so products stay inside int64.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def member_keys(seeds: torch.Tensor, *counters: int) -> torch.Tensor:
    """Derive one 32-bit key per member from its seed and a tuple of counters.

    Args:
        seeds: Member seeds, int64 ``(K,)``.
        *counters: Non-negative ints (stream id, epoch, step, layer, ...).

    Returns:
        int64 ``(K,)`` keys in ``[0, 2**32)``.
    """
    keys = _mix(seeds & _M32)
    for counter in counters:
        keys = _mix(keys ^ ((counter * 0x9E3779B9 + 0x632BE5AB) & _M32))
    return keys


def random_bits(keys: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` pseudo-random 32-bit integers per member (int64 ``(K, n)``), e.g. for shuffling."""
    index = torch.arange(n, device=keys.device, dtype=torch.int64)
    return _mix(_mix(index ^ keys[:, None]) ^ ((keys[:, None] * 0x5851F42D) & _M32))


def uniform(keys: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` float32 uniforms in ``[0, 1)`` per member: ``(K, n)``."""
    return (random_bits(keys, n) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def normal(keys: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` float32 standard normals per member (Box-Muller): ``(K, n)``."""
    half = (n + 1) // 2
    bits = random_bits(keys, 2 * half)
    u1 = ((bits[:, :half] >> 8).to(torch.float32) + 1.0) * (1.0 / (1 << 24))
    u2 = (bits[:, half:] >> 8).to(torch.float32) * (1.0 / (1 << 24))
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :n]
