"""``caviar schedule ...``: schedules on the local database or, with ``--url``, a caviar service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from caviar.service.cli_helpers import (
    DatabaseUrl,
    JsonFlag,
    ServiceToken,
    ServiceUrl,
    backend_for,
    console,
    print_json,
    read_documents,
    safe,
)

schedule_app = typer.Typer(help="Scheduled batch studies (cron).", no_args_is_help=True)

Ref = Annotated[str, typer.Argument(help="Schedule id or name.")]


def _when(value: str | None) -> str:
    return value.replace("+00:00", "Z") if value else "-"


def _print_schedules(schedules: list[dict[str, Any]]) -> None:
    table = Table("id", "name", "cron", "timezone", "enabled", "next run (UTC)", "runs", "misfire", "overlap")
    for s in schedules:
        runs = f"{s['run_count']}/{s['max_runs']}" if s["max_runs"] else str(s["run_count"])
        table.add_row(
            str(s["id"]),
            safe(s["name"]),
            safe(s["cron"]),
            safe(s["timezone"]),
            "yes" if s["enabled"] else "no",
            _when(s["next_run_at"]),
            runs,
            s["misfire"],
            s["overlap"],
        )
    console.print(table)


def _print_runs(runs: list[dict[str, Any]]) -> None:
    table = Table("tick (UTC)", "fired (UTC)", "outcome", "study", "state", "message")
    for r in runs:
        outcome = r["outcome"] + (" (manual)" if r["manual"] else "")
        table.add_row(
            _when(r["tick_at"]),
            _when(r["fired_at"]),
            outcome,
            safe(r["study_name"] or "-"),
            r["study_state"] or "-",
            safe(r["message"] or ""),
        )
    console.print(table)


@schedule_app.command("add")
def schedule_add(
    file: Annotated[Path, typer.Option("-f", "--file", help="YAML/JSON file with one or several schedules.")],
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Create schedules from a file (name, cron, timezone, template, policies)."""
    documents = read_documents(file)
    with backend_for(url, token, database_url) as backend:
        created = backend.add_schedules(documents)
    if as_json:
        print_json(created if len(created) > 1 else created[0])
        return
    for s in created:
        console.print(
            f"created schedule [bold]{safe(s['name'])}[/] (id {s['id']}), next run {_when(s['next_run_at'])}"
        )


@schedule_app.command("list")
def schedule_list(
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """List schedules."""
    with backend_for(url, token, database_url) as backend:
        page = backend.list_schedules()
    if as_json:
        print_json(page)
    else:
        _print_schedules(page["items"])


@schedule_app.command("show")
def schedule_show(
    ref: Ref,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Show one schedule and its template."""
    with backend_for(url, token, database_url) as backend:
        data = backend.schedule(ref)
    if as_json:
        print_json(data)
        return
    _print_schedules([data])
    console.print_json(data=data["template"])


def _set_enabled(
    ref: str, enabled: bool, database_url: str | None, url: str | None, token: str | None, as_json: bool
) -> None:
    with backend_for(url, token, database_url) as backend:
        data = backend.update_schedule(ref, {"enabled": enabled})
    if as_json:
        print_json(data)
        return
    word = "enabled" if enabled else "disabled"
    console.print(f"{word} schedule {safe(data['name'])}, next run {_when(data['next_run_at'])}")


@schedule_app.command("enable")
def schedule_enable(
    ref: Ref,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Enable a schedule (its next run is the next tick from now)."""
    _set_enabled(ref, True, database_url, url, token, as_json)


@schedule_app.command("disable")
def schedule_disable(
    ref: Ref,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Disable a schedule (no ticks fire until it is enabled again)."""
    _set_enabled(ref, False, database_url, url, token, as_json)


@schedule_app.command("run")
def schedule_run(
    ref: Ref,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Create the schedule's study now (a manual run)."""
    with backend_for(url, token, database_url) as backend:
        data = backend.run_schedule(ref)
    if as_json:
        print_json(data)
    else:
        console.print(f"created study [bold]{safe(data['study_name'])}[/] (manual run)")


@schedule_app.command("runs")
def schedule_runs(
    ref: Ref,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """List a schedule's runs, newest first, with their studies' state."""
    with backend_for(url, token, database_url) as backend:
        page = backend.schedule_runs(ref, limit=limit)
    if as_json:
        print_json(page)
    else:
        _print_runs(page["items"])


@schedule_app.command("delete")
def schedule_delete(
    ref: Ref,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Delete a schedule and its run history (the studies it created stay)."""
    with backend_for(url, token, database_url) as backend:
        backend.delete_schedule(ref)
    if as_json:
        print_json({"deleted": ref})
    else:
        console.print(f"deleted schedule {safe(ref)}")
