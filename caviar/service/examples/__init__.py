"""Example study definitions shipped with caviar."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent


def example_path(name: str) -> Path:
    """The path of a shipped example definition (``digits-mlp``)."""
    return _HERE / f"{name}.yaml"
