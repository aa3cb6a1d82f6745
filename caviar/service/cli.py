"""The ``caviar`` command line.

Every command works on the local database (``--database-url`` / ``CAVIAR_DATABASE_URL``);
output is a table for people or JSON with ``--json``; errors are one line on stderr with a
non-zero exit code.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import caviar
from caviar.service.cli_helpers import (
    DOMAIN_ERRORS,
    DatabaseUrl,
    JsonFlag,
    LogFormatOption,
    LogLevelOption,
    ServiceToken,
    ServiceUrl,
    backend_for,
    console,
    err_console,
    fail,
    print_json,
    read_documents,
    safe,
    settings_from,
)
from caviar.service.schedules.cli import schedule_app
from caviar.service.tokens.cli import token_app

app = typer.Typer(
    name="caviar", help="caviar: hyperparameter tuning service for PyTorch models.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
study_app = typer.Typer(help="Studies.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(study_app, name="study")
app.add_typer(token_app, name="token")
app.add_typer(schedule_app, name="schedule")


def _study_row(study: dict[str, Any]) -> list[str]:
    counts = study["trial_counts"]
    best = study.get("best")
    best_text = ""
    if best and "value" in best:
        best_text = f"{best['value']:.4g} (#{best['number']})"
    elif best:
        best_text = f"{len(best['trials'])} on front"
    done = counts["complete"] + counts["pruned"]
    n_trials = study["definition"]["budget"]["n_trials"]
    return [
        safe(study["name"]),
        study["state"],
        f"{done}/{n_trials}",
        str(counts["running"]),
        str(counts["fail"]),
        best_text,
    ]


def print_studies(studies: list[dict[str, Any]]) -> None:
    table = Table("name", "state", "done", "running", "failed", "best")
    for study in studies:
        table.add_row(*_study_row(study))
    console.print(table)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"caviar {caviar.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """caviar: hyperparameter tuning service for PyTorch models."""


@db_app.command("upgrade")
def db_upgrade(database_url: DatabaseUrl = None) -> None:
    """Create Optuna's schema and migrate caviar's tables to the newest revision."""
    # lazy: Alembic, SQLAlchemy and Optuna load only for the commands that need them
    from caviar import storage

    url = settings_from(database_url).database_url
    try:
        revision = storage.upgrade(url)
    except Exception as exc:  # a friendly line instead of a traceback
        fail(f"could not migrate {storage.display_url(url)}: {exc.__class__.__name__}: {exc}")
    console.print(f"database at revision {revision}")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    processes: Annotated[int | None, typer.Option(help="Server processes (default: one per core).")] = None,
    database_url: DatabaseUrl = None,
    token: Annotated[str | None, typer.Option(envvar="CAVIAR_API_TOKEN", help="Admin API token.")] = None,
    no_migrate: Annotated[
        bool, typer.Option("--no-migrate", help="Skip `caviar db upgrade` at start.")
    ] = False,
    wait_for_db: Annotated[
        float | None,
        typer.Option(
            "--wait-for-db",
            min=0,
            help="Seconds to wait for the database at start, retrying with backoff (default 180).",
            show_default=False,
        ),
    ] = None,
    log_format: LogFormatOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Run the REST API (waiting for the database and migrating it first)."""
    # lazy: uvicorn, FastAPI and the service load only to serve
    from caviar.service.metrics import prepare_multiprocess
    from caviar.service.server import serve as run_server

    settings = settings_from(
        database_url,
        host=host,
        port=port,
        processes=processes,
        api_token=SecretStr(token) if token else None,
        migrate_on_start=False if no_migrate else None,
        wait_for_db_s=wait_for_db,
        log_format=log_format,
        log_level=log_level,
    )
    prepare_multiprocess(settings.processes)
    run_server(settings)


@app.command()
def dashboard(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default 127.0.0.1).")] = None,
    port: Annotated[int, typer.Option(help="Port.")] = 8080,
    database_url: DatabaseUrl = None,
    token: Annotated[str | None, typer.Option(envvar="CAVIAR_API_TOKEN", help="Admin API token.")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run optuna-dashboard on the caviar database on its own port (same auth as the API)."""
    # lazy: uvicorn, the dashboard and the database load only to serve
    import uvicorn

    from caviar.service.dashboard import create_dashboard_app
    from caviar.service.db import Database
    from caviar.service.server import check_bind_allowed

    secret = SecretStr(token) if token else None
    settings = settings_from(database_url, host=host, port=port, api_token=secret)
    check_bind_allowed(settings)
    db = Database(settings.database_url)
    console.print(f"optuna-dashboard on http://{settings.host}:{settings.port}/dashboard")
    try:
        uvicorn.run(
            create_dashboard_app(settings, db),
            host=settings.host,
            port=settings.port,
            log_level=log_level,
            access_log=False,
        )
    finally:
        db.dispose()


def _warm_start(value: str) -> dict[str, Any]:
    """``NAME`` or ``NAME:K`` as a definition's ``warm_start``."""
    source, _, top_k = value.partition(":")
    if not source or (top_k and not top_k.isdigit()):
        fail(f"--warm-start: expected NAME or NAME:K (K a number of trials), not {value!r}")
    return {"from": source, "top_k": int(top_k)} if top_k else {"from": source}


@study_app.command("create")
def study_create(
    file: Annotated[
        Path, typer.Option("-f", "--file", help="YAML/JSON file with one or several definitions.")
    ],
    warm_start: Annotated[
        str | None,
        typer.Option(
            "--warm-start",
            metavar="NAME[:K]",
            help="Start from the K (default 10) best trials of study NAME that fit the space.",
        ),
    ] = None,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Create studies from a definition file."""
    documents = read_documents(file)
    if warm_start is not None:
        documents = [{**doc, "warm_start": _warm_start(warm_start)} for doc in documents]
    created: list[dict[str, Any]] = []
    with backend_for(url, token, database_url) as backend:
        try:
            backend.check_definitions(documents)
            for doc in documents:
                created.append(backend.create_study(doc))
        except DOMAIN_ERRORS:
            if created:
                err_console.print(f"created {safe(', '.join(s['name'] for s in created))} before the error")
            raise
    if as_json:
        print_json(created if len(created) > 1 else created[0])
    else:
        for study in created:
            console.print(f"created study [bold]{safe(study['name'])}[/] ({study['state']})")
            seeded = study.get("warm_start")
            if seeded:
                console.print(
                    f"  warm start from {safe(seeded['from'])}: {seeded['enqueued']} trials enqueued, "
                    f"{seeded['skipped']} skipped",
                    highlight=False,
                )
                for skipped in seeded["reasons"]:
                    console.print(
                        f"    trial {skipped['number']}: {safe(skipped['reason'])}", highlight=False
                    )


@study_app.command("list")
def study_list(
    state: Annotated[str | None, typer.Option(help="Only studies in this state.")] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="key or key=value (repeatable: all must match).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """List studies, newest first."""
    with backend_for(url, token, database_url) as backend:
        data = backend.list_studies(state=state, tags=tag or (), limit=limit)
    if as_json:
        print_json(data)
    else:
        print_studies(data["items"])


@study_app.command("show")
def study_show(
    name: str,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Show one study."""
    with backend_for(url, token, database_url) as backend:
        study = backend.study(name)
    if as_json:
        print_json(study)
    else:
        print_studies([study])
        console.print_json(data=study["definition"])


def _trial_value(trial: dict[str, Any]) -> str:
    if trial.get("values") and len(trial["values"]) > 1:
        return ", ".join(f"{v:.6g}" for v in trial["values"])
    return "" if trial.get("value") is None else f"{trial['value']:.6g}"


def print_trials(trials: list[dict[str, Any]]) -> None:
    """Trials as a table: number, state, value(s), decoded parameters."""
    table = Table("#", "state", "value", "params", "worker", "retry of")
    for trial in trials:
        params = safe(
            ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial["params"].items()
            )
        )
        retry = "" if trial.get("retry_of") is None else str(trial["retry_of"])
        table.add_row(
            str(trial["number"]),
            trial["state"],
            _trial_value(trial),
            params,
            safe(trial.get("worker_id") or ""),
            retry,
        )
    console.print(table)


@study_app.command("trials")
def study_trials(
    name: str,
    state: Annotated[str | None, typer.Option(help="waiting | running | complete | pruned | fail")] = None,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """List a study's trials, ordered by number."""
    with backend_for(url, token, database_url) as backend:
        trials = backend.trials(name, state=state)
    if as_json:
        print_json(trials)
    else:
        print_trials(trials)


@study_app.command("best")
def study_best(
    name: str,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """The best trial (the Pareto front for a multi-objective study)."""
    with backend_for(url, token, database_url) as backend:
        best = backend.best(name)
    if as_json:
        print_json(best)
    else:
        print_trials(best.get("trials", [best]))


@study_app.command("export")
def study_export(
    name: str,
    format: Annotated[str, typer.Option("--format", help="csv | json")] = "csv",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File (default: stdout).")] = None,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
) -> None:
    """Export every trial of a study as CSV (one params.<name> column per parameter) or JSON."""
    if format not in ("csv", "json"):
        fail(f"--format: expected csv or json, not {format!r}")
    with backend_for(url, token, database_url) as backend:
        text = backend.export(name, format)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        rows = json.loads(text) if format == "json" else list(csv.DictReader(io.StringIO(text)))
        count = len(rows)
        err_console.print(f"wrote {count} trials to {safe(output)}")


@study_app.command("refine")
def study_refine(
    name: str,
    top_fraction: Annotated[float, typer.Option(help="Share of complete trials kept.")] = 0.2,
    min_top: Annotated[int, typer.Option(help="Keep at least this many trials.")] = 3,
    margin: Annotated[float, typer.Option(help="Widen each envelope by this share.")] = 0.25,
    n_trials: Annotated[int | None, typer.Option(help="Budget of the new study.")] = None,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Coarse to fine: create a new study with the space narrowed around the top trials."""
    options: dict[str, Any] = {"top_fraction": top_fraction, "min_top": min_top, "margin": margin}
    if n_trials is not None:
        options["n_trials"] = n_trials
    with backend_for(url, token, database_url) as backend:
        study = backend.refine(name, options)
    if as_json:
        print_json(study)
    else:
        console.print(f"created study [bold]{safe(study['name'])}[/] refined from {safe(name)}")
        console.print_json(data=study["definition"]["search_space"])


def _print_study_line(study: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(study)
        return
    budget = study["definition"]["budget"]
    line = f"study [bold]{safe(study['name'])}[/] {study['state']}: n_trials {budget['n_trials']}"
    if study.get("stop_reason"):
        line += f" ({safe(study['stop_reason'])})"
    console.print(line, highlight=False)


@study_app.command("pause")
def study_pause(
    name: str,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Stop handing out trials (running ones go on); `resume` restarts."""
    with backend_for(url, token, database_url) as backend:
        _print_study_line(backend.pause_study(name), as_json)


@study_app.command("resume")
def study_resume(
    name: str,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Hand out trials again after a pause."""
    with backend_for(url, token, database_url) as backend:
        _print_study_line(backend.resume_study(name), as_json)


@study_app.command("stop")
def study_stop(
    name: str,
    reason: Annotated[str | None, typer.Option(help="Recorded as the stop reason.")] = None,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """End a study: no new trials, waiting ones cancelled, running ones stopped at their next report."""
    with backend_for(url, token, database_url) as backend:
        _print_study_line(backend.stop_study(name, reason), as_json)


@study_app.command("delete")
def study_delete(
    name: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
) -> None:
    """Delete a study, its trials and the files stored with them (checkpoints, logs)."""
    if not yes and not typer.confirm(f"delete study {safe(name)} with all its trials and files?"):
        fail("not deleted")
    with backend_for(url, token, database_url) as backend:
        backend.delete_study(name)
    console.print(f"deleted study {safe(name)}", highlight=False)


@study_app.command("extend")
def study_extend(
    name: str,
    n_trials: Annotated[int | None, typer.Option("--n-trials", min=1, help="The new total budget.")] = None,
    by: Annotated[int | None, typer.Option("--by", min=1, help="Add this many trials to the budget.")] = None,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Raise a study's trial budget (a completed study is reopened for workers)."""
    if (n_trials is None) == (by is None):
        fail("give --n-trials N (the new total) or --by K (more trials)")
    with backend_for(url, token, database_url) as backend:
        current = int(backend.study(name)["definition"]["budget"]["n_trials"])
        target = n_trials if n_trials is not None else current + (by or 0)
        if target <= current:
            fail(f"--n-trials: {target} does not raise the budget of {current} (lower it with `study set`)")
        _print_study_line(backend.update_study(name, {"budget": {"n_trials": target}}), as_json)


def _limit(option: str, value: str | None, kind: type[int] | type[float]) -> int | float | None:
    """A number, or ``none`` to remove the limit."""
    if value is None or value.lower() == "none":
        return None
    try:
        number = kind(value)
    except ValueError:
        fail(f"{option}: expected a number or none, not {value!r}")
    return number


@study_app.command("set")
def study_set(
    name: str,
    n_trials: Annotated[
        int | None, typer.Option("--n-trials", help="Trial budget (never below used).")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="Higher runs first.")] = None,
    max_parallel: Annotated[str | None, typer.Option("--max-parallel", help="N, or none.")] = None,
    max_failed_trials: Annotated[int | None, typer.Option("--max-failed-trials")] = None,
    trial_timeout: Annotated[str | None, typer.Option("--trial-timeout", help="Seconds, or none.")] = None,
    max_duration: Annotated[str | None, typer.Option("--max-duration", help="Seconds, or none.")] = None,
    goal: Annotated[str | None, typer.Option(help="Stop once a trial reaches this value; none.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="key=value (repeatable).")] = None,
    untag: Annotated[list[str] | None, typer.Option("--untag", help="Remove a tag (repeatable).")] = None,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Change a study's budget, priority or tags (only the options given change)."""
    budget: dict[str, Any] = {}
    if n_trials is not None:
        budget["n_trials"] = n_trials
    if max_failed_trials is not None:
        budget["max_failed_trials"] = max_failed_trials
    for key, option, raw, kind in (
        ("max_parallel", "--max-parallel", max_parallel, int),
        ("trial_timeout_s", "--trial-timeout", trial_timeout, float),
        ("max_duration_s", "--max-duration", max_duration, float),
    ):
        if raw is not None:
            budget[key] = _limit(option, raw, kind)
    if goal is not None:
        goal_value = _limit("--goal", goal, float)
        budget["goal"] = None if goal_value is None else {"value": goal_value}
    change: dict[str, Any] = {}
    if budget:
        change["budget"] = budget
    if priority is not None:
        change["priority"] = priority
    tags: dict[str, str | None] = {}
    for item in tag or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--tag: expected key=value, not {item!r}")
        tags[key] = value
    for key in untag or []:
        tags[key] = None
    if tags:
        change["tags"] = tags
    if not change:
        fail("nothing to change: give --n-trials, --priority, --max-parallel, --tag, ...")
    with backend_for(url, token, database_url) as backend:
        _print_study_line(backend.update_study(name, change), as_json)


@study_app.command("enqueue")
def study_enqueue(
    name: str,
    file: Annotated[
        Path,
        typer.Option(
            "-f",
            "--file",
            help="YAML/JSON: parameter sets (decoded names), or {params, value|values} to import results.",
        ),
    ],
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Enqueue parameter sets (handed out before new samples), or import them with known values."""
    items = [doc if isinstance(doc.get("params"), dict) else {"params": doc} for doc in read_documents(file)]
    with backend_for(url, token, database_url) as backend:
        added = backend.enqueue(name, items)
    if as_json:
        print_json(added)
        return
    waiting = sum(1 for t in added["items"] if t["state"] == "waiting")
    console.print(
        f"study {safe(name)}: {waiting} enqueued, {added['total'] - waiting} imported", highlight=False
    )
    print_trials(added["items"])


@study_app.command("importances")
def study_importances(
    name: str,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Parameter importances (one column per metric for a multi-objective study)."""
    with backend_for(url, token, database_url) as backend:
        data = backend.importances(name)
    if as_json:
        print_json(data)
        return
    found = data["importances"]
    sets = found if found and isinstance(next(iter(found.values())), dict) else {"importance": found}
    params = sorted(
        {p for values in sets.values() for p in values},
        key=lambda p: -max(values.get(p, 0.0) for values in sets.values()),
    )
    if not params:
        console.print("no importances yet (they need at least 2 complete trials)")
        return
    table = Table("parameter", *sets)
    for param in params:
        table.add_row(safe(param), *(f"{values.get(param, 0.0):.3f}" for values in sets.values()))
    console.print(table)


FINAL_STATES = ("completed", "failed", "stopped")


@study_app.command("watch")
def study_watch(
    name: str,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls.")] = 2.0,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
) -> None:
    """A live progress bar with the best value so far, until the study completes or fails."""

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with backend_for(url, token, database_url) as backend, Progress(*columns, console=console) as progress:
        task = progress.add_task(name, total=None)
        while True:
            study = backend.study(name)
            counts = study["trial_counts"]
            done = counts["complete"] + counts["pruned"]
            best = _study_row(study)[-1] or "-"
            progress.update(
                task,
                total=study["definition"]["budget"]["n_trials"],
                completed=done,
                description=f"{safe(name)} ({study['state']}) running {counts['running']}, best {best}",
            )
            if study["state"] in FINAL_STATES:
                break
            time.sleep(interval)
    console.print(f"study {safe(name)} {study['state']}: best {_study_row(study)[-1] or '-'}")


@app.command()
def queue(
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Studies queued or running, in the order workers take them (priority, then oldest)."""
    with backend_for(url, token, database_url) as backend:
        data = backend.list_studies(limit=limit, queue=True)
    if as_json:
        print_json(data)
    else:
        print_studies(data["items"])


@app.command()
def worker(
    url: Annotated[
        str | None,
        typer.Option(envvar="CAVIAR_URL", help="The caviar service (default: http://127.0.0.1:8000)."),
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="CAVIAR_API_TOKEN", help="A worker-scope token.", show_default=False)
    ] = None,
    gpus: Annotated[str, typer.Option(help="all | none | comma-separated GPU indices.")] = "all",
    per_gpu: Annotated[int, typer.Option("--per-gpu", min=1, help="Slots (processes) per GPU.")] = 1,
    cpu: Annotated[int | None, typer.Option(min=0, help="CPU slots (default: 1 when no GPU slot).")] = None,
    study: Annotated[list[str] | None, typer.Option(help="Only these studies (repeatable).")] = None,
    fuse: Annotated[int | None, typer.Option(min=1, help="Train up to K trials of a study fused.")] = None,
    max_trials: Annotated[
        int | None, typer.Option("--max-trials", min=1, help="Each slot exits after N.")
    ] = None,
    exit_when_idle: Annotated[
        float | None, typer.Option("--exit-when-idle", min=0, help="Exit after this many idle seconds.")
    ] = None,
    poll_interval: Annotated[float, typer.Option("--poll-interval", min=0.05)] = 2.0,
    data_dir: Annotated[
        str | None,
        typer.Option(envvar="CAVIAR_DATA_DIR", help="The only directory file: datasets are read from."),
    ] = None,
    # ---- user code (codegov): --allow-code, --pass-env -> WorkerOptions.allow_code / pass_env ----
    allow_code: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-code",
            metavar="SPEC",
            help="Run this user code (repeatable): python:MODULE_PREFIX, command:PROGRAM [ARGS] "
            "(an absolute path or a bare name) or all (anything a write token submits). "
            "Nothing else runs.",
        ),
    ] = None,
    pass_env: Annotated[
        list[str] | None,
        typer.Option(
            "--pass-env",
            metavar="NAME",
            help="Also pass this variable (or PREFIX*) of the worker's environment to user code "
            "(repeatable; HOME, LANG, LC_*, TZ, TMPDIR, PATH, CUDA_* pass by default; never CAVIAR_*).",
        ),
    ] = None,
    # ---- end of user code options ----
    log_format: LogFormatOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Draw trials from a caviar service and run them: one process per device slot (REST only)."""
    # lazy: the worker package pulls in the trainer (torch) in its slot processes
    from caviar.worker import WorkerOptions, run_workers

    options = WorkerOptions(
        url=url,
        token=token,
        gpus=gpus,
        per_gpu=per_gpu,
        cpu=cpu,
        studies=tuple(study or ()),
        fuse=fuse,
        max_trials=max_trials,
        poll_interval_s=poll_interval,
        exit_when_idle_s=exit_when_idle,
        data_dir=data_dir,
        allow_code=tuple(allow_code or ()),
        pass_env=tuple(pass_env or ()),
        log_format=log_format or "text",
        log_level=log_level or "info",
    )
    try:
        code = run_workers(options)
    except ValueError as exc:
        fail(str(exc))
    raise typer.Exit(code)


@app.command()
def gradcheck(
    model: Annotated[str, typer.Option(help="mlp | cnn")] = "mlp",
    members: Annotated[int, typer.Option("-k", "--members", min=1, help="Fused group size.")] = 3,
    seed: int = 0,
    as_json: JsonFlag = False,
) -> None:
    """Compare analytic and numerical gradients of the fused layers in float64 (fails above 1e-7)."""
    # lazy: torch
    from caviar.trainer import gradcheck as check

    if model not in ("mlp", "cnn"):
        fail(f"--model must be mlp or cnn (got {model!r})")
    differences = check(model=model, k=members, seed=seed)
    worst = max(differences.values())
    if as_json:
        print_json({"model": model, "relative_difference": differences, "max": worst, "ok": worst < 1e-7})
    else:
        table = Table("parameter", "relative difference", "")
        for name, value in differences.items():
            table.add_row(name, f"{value:.3e}", "ok" if value < 1e-7 else "[red]FAIL[/]")
        console.print(table)
        console.print(f"max {worst:.3e} (threshold 1e-7): {'passed' if worst < 1e-7 else 'FAILED'}")
    if worst >= 1e-7:
        raise typer.Exit(1)


@study_app.command("checkpoint")
def study_checkpoint(
    name: str,
    trial: Annotated[
        int | None, typer.Option(help="Trial number (default: the best with a checkpoint).")
    ] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Where to write it.")] = None,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
) -> None:
    """Download a trained checkpoint (the best trial's by default)."""
    with backend_for(url, token, database_url) as backend:
        number, filename, content = backend.checkpoint(name, trial)
    target = output or Path(f"{name}-trial{number}-{filename}")
    target.write_bytes(content)
    console.print(f"trial {number} checkpoint written to {safe(target)}", highlight=False)


@study_app.command("artifacts")
def study_artifacts(
    name: str,
    trial: Annotated[int, typer.Option(help="Trial number.")],
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """List the files stored with a trial (checkpoint.pt, trial.log, uploads)."""
    with backend_for(url, token, database_url) as backend:
        items = backend.artifacts(name, trial)
    if as_json:
        print_json(items)
        return
    table = Table("file", "artifact id")
    for item in items:
        table.add_row(safe(item["filename"]), item["artifact_id"])
    console.print(table)


@study_app.command("download")
def study_download(
    name: str,
    filename: Annotated[str, typer.Argument(help="The file's name, e.g. trial.log.")],
    trial: Annotated[int, typer.Option(help="Trial number.")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Where to write it ('-': stdout).")
    ] = None,
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
) -> None:
    """Download a file stored with a trial (a log to the terminal: `... trial.log --trial N -o -`)."""
    with backend_for(url, token, database_url) as backend:
        content = backend.download(name, trial, filename)
    if output is not None and str(output) == "-":
        sys.stdout.buffer.write(content)
        return
    target = output or Path(f"{name}-trial{trial}-{filename}")
    target.write_bytes(content)
    console.print(f"trial {trial} {safe(filename)} written to {safe(target)}", highlight=False)


@app.command("workers")
def workers_list(
    database_url: DatabaseUrl = None,
    url: ServiceUrl = None,
    token: ServiceToken = None,
    as_json: JsonFlag = False,
) -> None:
    """Registered workers: device, current trials, last heartbeat, live or lost."""
    with backend_for(url, token, database_url) as backend:
        data = backend.workers()
    if as_json:
        print_json(data)
        return
    table = Table("id", "device", "status", "trials", "last seen")
    for item in data["items"]:
        trials = ", ".join(f"{t['study']}#{t['number']}" for t in item["current_trials"])
        table.add_row(
            safe(item["id"]), safe(item["device"]), item["status"], safe(trials), str(item["last_seen_at"])
        )
    console.print(table)


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="API port (the next free one is used if taken).")] = 8000,
    n_trials: Annotated[
        int | None, typer.Option("--n-trials", min=1, help="Default: the example's 60.")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="CPU worker slots.")] = 2,
    fuse: Annotated[int, typer.Option(min=1, help="Trials per fused group.")] = 4,
    database_url: DatabaseUrl = None,
    keep_serving: Annotated[
        bool, typer.Option("--keep-serving", help="Leave the API up at the end.")
    ] = False,
) -> None:
    """Tune the digits MLP end to end: API + workers + the example study, with live progress."""
    # lazy: the demo drives the local database directly
    from caviar.service.demo import run_demo

    settings = settings_from(database_url)
    raise typer.Exit(
        run_demo(
            settings, port=port, n_trials=n_trials, workers=workers, fuse=fuse, keep_serving=keep_serving
        )
    )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
