"""``caviar gradcheck``: the fused layers' analytic gradients against numerical ones (float64)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from caviar.cli._common import JsonFlag, console, fail, print_json

THRESHOLD = 1e-7


def gradcheck(
    model: Annotated[str, typer.Option(help="mlp | cnn")] = "mlp",
    members: Annotated[int, typer.Option("-k", "--members", min=1, help="Fused group size.")] = 3,
    seed: int = 0,
    as_json: JsonFlag = False,
) -> None:
    """Compare analytic and numerical gradients of the fused layers in float64 (fails above 1e-7)."""
    if model not in ("mlp", "cnn"):
        fail(f"--model must be mlp or cnn (got {model!r})")
    # lazy: torch loads only for this command
    from caviar.trainer import gradcheck as check

    differences = check(model=model, k=members, seed=seed)
    worst = max(differences.values())
    if as_json:
        print_json(
            {"model": model, "relative_difference": differences, "max": worst, "ok": worst < THRESHOLD}
        )
    else:
        table = Table("parameter", "relative difference", "")
        for name, value in differences.items():
            table.add_row(name, f"{value:.3e}", "ok" if value < THRESHOLD else "[red]FAIL[/]")
        console.print(table)
        console.print(f"max {worst:.3e} (threshold 1e-7): {'passed' if worst < THRESHOLD else 'FAILED'}")
    if worst >= THRESHOLD:
        raise typer.Exit(1)
