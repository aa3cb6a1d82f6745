"""Per-member random streams for fused groups.

Every member owns one ``torch.Generator`` per stream (shuffling, dropout, augmentation), seeded
from its own seed only. A member draws the same shapes in the same order whether it trains alone
or in a group, so its noise does not depend on K; a member that leaves simply drops its
generators. Streams are separate so that drawing augmentation noise for a group never shifts a
member's dropout masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "STREAM_AUGMENT",
    "STREAM_DROPOUT",
    "STREAM_SHUFFLE",
    "bits16",
    "member_generators",
    "normal",
    "permutations",
    "stream_seed",
    "uniform",
]

STREAM_SHUFFLE = 1
STREAM_DROPOUT = 2
STREAM_AUGMENT = 3

_M64 = (1 << 64) - 1


def stream_seed(seed: int, stream: int) -> int:
    """Mix a member seed and a stream id into a 63-bit generator seed (splitmix64 finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return (x ^ (x >> 31)) >> 1


def member_generators(seeds: Sequence[int], stream: int, device: torch.device) -> list[torch.Generator]:
    """One generator per member for a stream, seeded from the member's seed only."""
    return [torch.Generator(device=device).manual_seed(stream_seed(int(s), stream)) for s in seeds]


def uniform(gens: Sequence[torch.Generator], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(K, *shape)`` uniforms in ``[0, 1)``; row ``k`` drawn from ``gens[k]``."""
    out = torch.empty((len(gens), *shape), device=device)
    for row, gen in zip(out, gens, strict=True):
        row.uniform_(0.0, 1.0, generator=gen)
    return out


def bits16(gens: Sequence[torch.Generator], n: int, device: torch.device) -> torch.Tensor:
    """``(K, n)`` uniformly distributed int16 values (four per 64-bit draw); row ``k`` from ``gens[k]``."""
    words = torch.empty((len(gens), (n + 3) // 4), dtype=torch.int64, device=device)
    for row, gen in zip(words, gens, strict=True):
        row.random_(-(2**63), None, generator=gen)
    return words.view(torch.int16)[:, :n]


def normal(gens: Sequence[torch.Generator], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(K, *shape)`` standard normals; row ``k`` drawn from ``gens[k]``."""
    out = torch.empty((len(gens), *shape), device=device)
    for row, gen in zip(out, gens, strict=True):
        row.normal_(0.0, 1.0, generator=gen)
    return out


def permutations(gens: Sequence[torch.Generator], n: int, device: torch.device) -> torch.Tensor:
    """``(K, n)`` int64: an independent permutation of ``range(n)`` per member."""
    return torch.stack([torch.randperm(n, generator=gen, device=device) for gen in gens])
