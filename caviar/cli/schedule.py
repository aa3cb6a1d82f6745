"""``caviar schedule ...``: cron-scheduled batch studies over REST."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from caviar._client import Client
from caviar.cli._common import JsonFlag, api_command, console, create_all, output, read_documents, safe, say

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


def _show_schedule(data: dict[str, Any]) -> None:
    _print_schedules([data])
    console.print_json(data=data["template"])


@api_command(schedule_app, "add")
def schedule_add(
    api: Client,
    file: Annotated[Path, typer.Option("-f", "--file", help="YAML/JSON file with one or several schedules.")],
    as_json: JsonFlag = False,
) -> None:
    """Create schedules from a file (name, cron, timezone, template, policies), each in order."""

    def show(created: list[dict[str, Any]]) -> None:
        for s in created:
            say(
                f"created schedule [bold]{safe(s['name'])}[/] (id {s['id']}), "
                f"next run {_when(s['next_run_at'])}"
            )

    create_all(read_documents(file), api.create_schedule, "schedule", as_json, show)


@api_command(schedule_app, "list")
def schedule_list(api: Client, as_json: JsonFlag = False) -> None:
    """List schedules."""
    output(api.schedules(), as_json, lambda page: _print_schedules(page["items"]))


@api_command(schedule_app, "show")
def schedule_show(api: Client, ref: Ref, as_json: JsonFlag = False) -> None:
    """Show one schedule and its template."""
    output(api.schedule(ref), as_json, _show_schedule)


def _set_enabled(api: Client, ref: str, enabled: bool, as_json: bool) -> None:
    def show(data: dict[str, Any]) -> None:
        word = "enabled" if enabled else "disabled"
        say(f"{word} schedule {safe(data['name'])}, next run {_when(data['next_run_at'])}")

    output(api.update_schedule(ref, {"enabled": enabled}), as_json, show)


@api_command(schedule_app, "enable")
def schedule_enable(api: Client, ref: Ref, as_json: JsonFlag = False) -> None:
    """Enable a schedule (its next run is the next tick from now)."""
    _set_enabled(api, ref, True, as_json)


@api_command(schedule_app, "disable")
def schedule_disable(api: Client, ref: Ref, as_json: JsonFlag = False) -> None:
    """Disable a schedule (no ticks fire until it is enabled again)."""
    _set_enabled(api, ref, False, as_json)


@api_command(schedule_app, "run")
def schedule_run(api: Client, ref: Ref, as_json: JsonFlag = False) -> None:
    """Create the schedule's study now (a manual run)."""
    output(
        api.run_schedule(ref),
        as_json,
        lambda run: say(f"created study [bold]{safe(run['study_name'])}[/] (manual run)"),
    )


@api_command(schedule_app, "runs")
def schedule_runs(
    api: Client,
    ref: Ref,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List a schedule's runs, newest first, with their studies' state."""
    output(api.schedule_runs(ref, limit=limit), as_json, lambda page: _print_runs(page["items"]))


@api_command(schedule_app, "delete")
def schedule_delete(api: Client, ref: Ref, as_json: JsonFlag = False) -> None:
    """Delete a schedule and its run history (the studies it created stay)."""
    api.delete_schedule(ref)
    output({"deleted": ref}, as_json, lambda _: say(f"deleted schedule {safe(ref)}"))
