"""``caviar queue`` and ``caviar workers``: what the workers take next, and who the workers are."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from caviar._client import Client
from caviar.cli._common import JsonFlag, api_command, console, output, safe
from caviar.cli.study import print_studies

queue_app = typer.Typer()
"""Holds the two root commands until the root app takes them over (see ``_app``)."""


@api_command(queue_app, "queue")
def queue(
    api: Client, limit: Annotated[int, typer.Option(min=1, max=1000)] = 100, as_json: JsonFlag = False
) -> None:
    """Studies queued or running, in the order workers take them (priority, then oldest)."""
    output(api.list_studies(limit=limit, queue=True), as_json, lambda page: print_studies(page["items"]))


def _show_workers(page: dict[str, Any]) -> None:
    table = Table("id", "device", "status", "trials", "last seen")
    for item in page["items"]:
        trials = ", ".join(f"{t['study']}#{t['number']}" for t in item["current_trials"])
        table.add_row(
            safe(item["id"]), safe(item["device"]), item["status"], safe(trials), str(item["last_seen_at"])
        )
    console.print(table)


@api_command(queue_app, "workers")
def workers(api: Client, as_json: JsonFlag = False) -> None:
    """Registered workers: device, current trials, last heartbeat, live or lost."""
    output(api.workers(), as_json, _show_workers)
