"""``caviar schedule ...``: schedules on the local database.

The shared helpers (``fail``, ``open_db``, ...) live in :mod:`service.cli`, which imports this
module for ``schedule_app``; they are imported inside the commands so either module can be
imported first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

schedule_app = typer.Typer(help="Scheduled batch studies (cron).", no_args_is_help=True)

DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", envvar="CAVIAR_DATABASE_URL", help="SQLAlchemy URL of the database."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Ref = Annotated[str, typer.Argument(help="Schedule id or name.")]

_T = TypeVar("_T")


def _call(database_url: str | None, action: Callable[[Any], _T]) -> _T:
    """Run ``action(db)`` on a fresh database handle; a domain error becomes one line and exit 1."""
    from service.cli import fail, open_db
    from service.errors import CaviarError

    db = open_db(database_url)
    try:
        return action(db)
    except CaviarError as exc:
        fail(exc.message)
    finally:
        db.dispose()


def _emit(data: Any, as_json: bool, human: Callable[[], None]) -> None:
    from service.cli import print_json

    if as_json:
        print_json(data)
    else:
        human()


def _when(value: str | None) -> str:
    return value.replace("+00:00", "Z") if value else "-"


def _print_schedules(schedules: list[dict[str, Any]]) -> None:
    from service.cli import console

    table = Table("id", "name", "cron", "timezone", "enabled", "next run (UTC)", "runs", "misfire", "overlap")
    for s in schedules:
        runs = f"{s['run_count']}/{s['max_runs']}" if s["max_runs"] else str(s["run_count"])
        table.add_row(
            str(s["id"]),
            s["name"],
            s["cron"],
            s["timezone"],
            "yes" if s["enabled"] else "no",
            _when(s["next_run_at"]),
            runs,
            s["misfire"],
            s["overlap"],
        )
    console.print(table)


def _print_runs(runs: list[dict[str, Any]]) -> None:
    from service.cli import console

    table = Table("tick (UTC)", "fired (UTC)", "outcome", "study", "state", "message")
    for r in runs:
        outcome = r["outcome"] + (" (manual)" if r["manual"] else "")
        table.add_row(
            _when(r["tick_at"]),
            _when(r["fired_at"]),
            outcome,
            r["study_name"] or "-",
            r["study_state"] or "-",
            r["message"] or "",
        )
    console.print(table)


def _create_all(db: Any, specs: list[Any]) -> list[dict[str, Any]]:
    """Create the schedules in order; on an error, say which were created before it."""
    from service.cli import err_console
    from service.errors import CaviarError
    from service.schedules import service

    created: list[dict[str, Any]] = []
    try:
        for spec in specs:
            created.append(service.create_schedule(db, spec).model_dump(mode="json"))
    except CaviarError:
        if created:
            err_console.print(f"created {', '.join(s['name'] for s in created)} before the error")
        raise
    return created


@schedule_app.command("add")
def schedule_add(
    file: Annotated[Path, typer.Option("-f", "--file", help="YAML/JSON file with one or several schedules.")],
    database_url: DatabaseUrl = None,
    as_json: JsonFlag = False,
) -> None:
    """Create schedules from a file (name, cron, timezone, template, policies)."""
    from service.cli import console, fail, read_documents
    from service.errors import CaviarError
    from service.schedules import service

    documents = read_documents(file)
    try:  # every document is checked before any is created
        specs = [service.parse_create(doc) for doc in documents]
        for spec in specs:
            service.check_template(spec.name, spec.template)
    except CaviarError as exc:
        fail(exc.message)
    created = _call(database_url, lambda db: _create_all(db, specs))

    def human() -> None:
        for s in created:
            console.print(
                f"created schedule [bold]{s['name']}[/] (id {s['id']}), next run {_when(s['next_run_at'])}"
            )

    _emit(created if len(created) > 1 else created[0], as_json, human)


@schedule_app.command("list")
def schedule_list(database_url: DatabaseUrl = None, as_json: JsonFlag = False) -> None:
    """List schedules."""
    from service.schedules import service

    page = _call(database_url, lambda db: service.list_schedules(db, limit=1000)).model_dump(mode="json")
    _emit(page, as_json, lambda: _print_schedules(page["items"]))


@schedule_app.command("show")
def schedule_show(ref: Ref, database_url: DatabaseUrl = None, as_json: JsonFlag = False) -> None:
    """Show one schedule and its template."""
    from service.cli import console
    from service.schedules import service

    data = _call(database_url, lambda db: service.show_schedule(db, ref)).model_dump(mode="json")

    def human() -> None:
        _print_schedules([data])
        console.print_json(data=data["template"])

    _emit(data, as_json, human)


def _set_enabled(ref: str, enabled: bool, database_url: str | None, as_json: bool) -> None:
    from service.cli import console
    from service.schedules import service
    from service.schedules.schemas import ScheduleUpdate

    change = ScheduleUpdate(enabled=enabled)
    data = _call(database_url, lambda db: service.update_schedule(db, ref, change)).model_dump(mode="json")
    word = "enabled" if enabled else "disabled"
    _emit(
        data,
        as_json,
        lambda: console.print(f"{word} schedule {data['name']}, next run {_when(data['next_run_at'])}"),
    )


@schedule_app.command("enable")
def schedule_enable(ref: Ref, database_url: DatabaseUrl = None, as_json: JsonFlag = False) -> None:
    """Enable a schedule (its next run is the next tick from now)."""
    _set_enabled(ref, True, database_url, as_json)


@schedule_app.command("disable")
def schedule_disable(ref: Ref, database_url: DatabaseUrl = None, as_json: JsonFlag = False) -> None:
    """Disable a schedule (no ticks fire until it is enabled again)."""
    _set_enabled(ref, False, database_url, as_json)


@schedule_app.command("run")
def schedule_run(ref: Ref, database_url: DatabaseUrl = None, as_json: JsonFlag = False) -> None:
    """Create the schedule's study now (a manual run)."""
    from service.cli import console
    from service.schedules import service

    data = _call(database_url, lambda db: service.run_now(db, ref)).model_dump(mode="json")
    _emit(data, as_json, lambda: console.print(f"created study [bold]{data['study_name']}[/] (manual run)"))


@schedule_app.command("runs")
def schedule_runs(
    ref: Ref,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    database_url: DatabaseUrl = None,
    as_json: JsonFlag = False,
) -> None:
    """List a schedule's runs, newest first, with their studies' state."""
    from service.schedules import service

    page = _call(database_url, lambda db: service.list_runs(db, ref, limit=limit)).model_dump(mode="json")
    _emit(page, as_json, lambda: _print_runs(page["items"]))


@schedule_app.command("delete")
def schedule_delete(ref: Ref, database_url: DatabaseUrl = None, as_json: JsonFlag = False) -> None:
    """Delete a schedule and its run history (the studies it created stay)."""
    from service.cli import console
    from service.schedules import service

    _call(database_url, lambda db: service.delete_schedule(db, ref))
    _emit({"deleted": ref}, as_json, lambda: console.print(f"deleted schedule {ref}"))
