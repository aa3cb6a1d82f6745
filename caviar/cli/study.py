"""``caviar study ...``: create, inspect, steer and export studies over REST."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from caviar._client import Client, Study
from caviar.cli._common import (
    JsonFlag,
    api_command,
    console,
    create_all,
    err_console,
    fail,
    output,
    print_json,
    read_documents,
    safe,
    say,
)

study_app = typer.Typer(help="Studies.", no_args_is_help=True)

FINAL_STATES = ("completed", "failed", "stopped")
Name = Annotated[str, typer.Argument(help="The study's name.")]
TrialNumber = Annotated[int, typer.Option("--trial", help="Trial number.")]
TrialState = Annotated[str | None, typer.Option(help="waiting | running | complete | pruned | fail")]
StopReason = Annotated[str | None, typer.Option(help="Recorded as the stop reason.")]
Output = Annotated[Path | None, typer.Option("-o", "--output", help="Where to write it ('-': stdout).")]


# ---- output ---------------------------------------------------------------------------------


def best_text(study: dict[str, Any]) -> str:
    """The best value and its trial, or the size of the Pareto front."""
    best = study.get("best")
    if best and "value" in best:
        return f"{best['value']:.4g} (#{best['number']})"
    return f"{len(best['trials'])} on front" if best else ""


def print_studies(studies: list[dict[str, Any]]) -> None:
    """Studies as a table: name, state, trials done of the budget, running, failed, best."""
    table = Table("name", "state", "done", "running", "failed", "best")
    for study in studies:
        counts = study["trial_counts"]
        done = counts["complete"] + counts["pruned"]
        n_trials = study["definition"]["budget"]["n_trials"]
        table.add_row(
            safe(study["name"]),
            study["state"],
            f"{done}/{n_trials}",
            str(counts["running"]),
            str(counts["fail"]),
            best_text(study),
        )
    console.print(table)


def _trial_value(trial: dict[str, Any]) -> str:
    if trial.get("values") and len(trial["values"]) > 1:
        return ", ".join(f"{v:.6g}" for v in trial["values"])
    return "" if trial.get("value") is None else f"{trial['value']:.6g}"


def _lineage(trial: dict[str, Any]) -> str:
    """A PBT trial's lineage in short: ``#<parent>@<step>`` of its last exploit, ``(n x)`` if several."""
    attrs = trial.get("user_attrs") or {}
    if "pbt_parent" not in attrs:
        return ""
    text = f"#{attrs['pbt_parent']}@{attrs.get('pbt_step', '?')}"
    count = attrs.get("pbt_exploits", 1)
    return text if count == 1 else f"{text} ({count}x)"


def print_trials(trials: list[dict[str, Any]]) -> None:
    """Trials as a table: number, state, value(s), decoded parameters, worker, retry of; and for
    population-based training, the ``pbt parent`` column (the trial copied last, at which epoch)."""
    pbt = any(_lineage(trial) for trial in trials)
    table = Table("#", "state", "value", "params", "worker", "retry of", *(["pbt parent"] if pbt else []))
    for trial in trials:
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial["params"].items()
        )
        retry = "" if trial.get("retry_of") is None else str(trial["retry_of"])
        table.add_row(
            str(trial["number"]),
            trial["state"],
            _trial_value(trial),
            safe(params),
            safe(trial.get("worker_id") or ""),
            retry,
            *([safe(_lineage(trial))] if pbt else []),
        )
    console.print(table)


def _study_line(study: dict[str, Any]) -> None:
    budget = study["definition"]["budget"]
    line = f"study [bold]{safe(study['name'])}[/] {study['state']}: n_trials {budget['n_trials']}"
    if study.get("stop_reason"):
        line += f" ({safe(study['stop_reason'])})"
    say(line)


def _show_study(study: dict[str, Any]) -> None:
    print_studies([study])
    if study.get("stop_reason"):  # why it paused, stopped or failed (a setup error, ...)
        say(f"reason: {safe(study['stop_reason'])}")
    console.print_json(data=study["definition"])


def _show_created(created: list[dict[str, Any]]) -> None:
    for study in created:
        say(f"created study [bold]{safe(study['name'])}[/] ({study['state']})")
        seeded = study.get("warm_start")
        if seeded:
            say(
                f"  warm start from {safe(seeded['from'])}: {seeded['enqueued']} trials enqueued, "
                f"{seeded['skipped']} skipped"
            )
            for skipped in seeded["reasons"]:
                say(f"    trial {skipped['number']}: {safe(skipped['reason'])}")


def _show_importances(data: dict[str, Any]) -> None:
    found = data["importances"]
    sets = found if found and isinstance(next(iter(found.values())), dict) else {"importance": found}
    params = sorted(
        {p for values in sets.values() for p in values},
        key=lambda p: -max(values.get(p, 0.0) for values in sets.values()),
    )
    if not params:
        say("no importances yet (they need at least 2 complete trials)")
        return
    table = Table("parameter", *sets)
    for param in params:
        table.add_row(safe(param), *(f"{values.get(param, 0.0):.3f}" for values in sets.values()))
    console.print(table)


def _write(content: bytes, target: Path | None, default: Path, what: str) -> None:
    """Write a downloaded file to ``target`` (``-``: stdout), else to ``default`` in this folder."""
    if target is not None and str(target) == "-":
        sys.stdout.buffer.write(content)
        return
    path = target or default
    path.write_bytes(content)
    say(f"{what} written to {safe(path)}")


# ---- option parsing -------------------------------------------------------------------------


def _warm_start(value: str) -> dict[str, Any]:
    """``NAME`` or ``NAME:K`` as a definition's ``warm_start``."""
    source, _, top_k = value.partition(":")
    if not source or (top_k and not top_k.isdigit()):
        fail(f"--warm-start: expected NAME or NAME:K (K a number of trials), not {value!r}")
    return {"from": source, "top_k": int(top_k)} if top_k else {"from": source}


def _limit(option: str, value: str, kind: type[int] | type[float]) -> int | float | None:
    """A number, or ``none`` to remove the limit."""
    if value.lower() == "none":
        return None
    try:
        return kind(value)
    except ValueError:
        fail(f"{option}: expected a number or none, not {value!r}")


def _tags(tag: list[str], untag: list[str]) -> dict[str, str | None]:
    tags: dict[str, str | None] = {}
    for item in tag:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--tag: expected key=value, not {item!r}")
        tags[key] = value
    return tags | dict.fromkeys(untag)


# ---- commands -------------------------------------------------------------------------------


@api_command(study_app, "create")
def study_create(
    api: Client,
    file: Annotated[
        Path,
        typer.Option("-f", "--file", help="YAML/JSON file with one or several definitions ('-': stdin)."),
    ],
    warm_start: Annotated[
        str | None,
        typer.Option(
            "--warm-start",
            metavar="NAME[:K]",
            help="Start from the K (default 10) best trials of study NAME that fit the space.",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create studies from a definition file (each document in order)."""
    documents = read_documents(file)
    if warm_start is not None:
        documents = [{**doc, "warm_start": _warm_start(warm_start)} for doc in documents]

    def create(doc: dict[str, Any]) -> dict[str, Any]:
        return api.create_study(doc).created or {}

    create_all(documents, create, "study", as_json, _show_created)


@api_command(study_app, "list")
def study_list(
    api: Client,
    state: Annotated[str | None, typer.Option(help="Only studies in this state.")] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="key or key=value (repeatable: all must match).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    as_json: JsonFlag = False,
) -> None:
    """List studies, newest first."""
    page = api.list_studies(state=state, tags=tag or (), limit=limit)
    output(page, as_json, lambda data: print_studies(data["items"]))


def _simple(command: str, help: str, call: Callable[[Study], Any], show: Callable[[Any], None]) -> None:
    """Register ``caviar study <command> NAME [--json]``: one call on the study, then ``show``."""

    @api_command(study_app, command, help=help)
    def run(api: Client, name: Name, as_json: JsonFlag = False) -> None:
        output(call(api.study(name)), as_json, show)


_simple("show", "Show one study and its definition.", Study.info, _show_study)
_simple(
    "best",
    "The best trial (the Pareto front for a multi-objective study).",
    Study.best,
    lambda best: print_trials(best.get("trials", [best])),
)
_simple("pause", "Stop handing out trials (running ones go on); `resume` restarts.", Study.pause, _study_line)
_simple("resume", "Hand out trials again after a pause.", Study.resume, _study_line)
_simple(
    "importances",
    "Parameter importances (one column per metric for a multi-objective study).",
    Study.importances,
    _show_importances,
)


@api_command(study_app, "stop")
def study_stop(api: Client, name: Name, reason: StopReason = None, as_json: JsonFlag = False) -> None:
    """End a study: no new trials, waiting ones cancelled, running ones stopped at their next report."""
    output(api.study(name).stop(reason), as_json, _study_line)


@api_command(study_app, "trials")
def study_trials(api: Client, name: Name, state: TrialState = None, as_json: JsonFlag = False) -> None:
    """List a study's trials, ordered by number."""
    output(api.study(name).trials(state), as_json, print_trials)


@api_command(study_app, "export")
def study_export(
    api: Client,
    name: Name,
    format: Annotated[str, typer.Option("--format", help="csv | json")] = "csv",
    output_path: Annotated[
        Path | None, typer.Option("-o", "--output", help="File (default: stdout).")
    ] = None,
) -> None:
    """Export every trial of a study as CSV (one params.<name> column per parameter) or JSON."""
    if format not in ("csv", "json"):
        fail(f"--format: expected csv or json, not {format!r}")
    text = api.study(name).export(format)
    if output_path is None:
        sys.stdout.write(text)
        return
    output_path.write_text(text)
    rows = json.loads(text) if format == "json" else list(csv.DictReader(io.StringIO(text)))
    err_console.print(f"wrote {len(rows)} trials to {safe(output_path)}", highlight=False)


@api_command(study_app, "refine")
def study_refine(
    api: Client,
    name: Name,
    top_fraction: Annotated[float, typer.Option(help="Share of complete trials kept.")] = 0.2,
    min_top: Annotated[int, typer.Option(help="Keep at least this many trials.")] = 3,
    margin: Annotated[float, typer.Option(help="Widen each envelope by this share.")] = 0.25,
    n_trials: Annotated[int | None, typer.Option(help="Budget of the new study.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Coarse to fine: create a new study with the space narrowed around the top trials."""
    options: dict[str, Any] = {"top_fraction": top_fraction, "min_top": min_top, "margin": margin}
    if n_trials is not None:
        options["n_trials"] = n_trials
    study = api.study(name).refine(**options)
    if as_json:
        print_json(study)
        return
    say(f"created study [bold]{safe(study['name'])}[/] refined from {safe(name)}")
    console.print_json(data=study["definition"]["search_space"])


@api_command(study_app, "delete")
def study_delete(
    api: Client,
    name: Name,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a study, its trials and the files stored with them (checkpoints, logs)."""
    if not yes and not typer.confirm(f"delete study {safe(name)} with all its trials and files?"):
        fail("not deleted")
    api.study(name).delete()
    say(f"deleted study {safe(name)}")


@api_command(study_app, "extend")
def study_extend(
    api: Client,
    name: Name,
    n_trials: Annotated[int | None, typer.Option("--n-trials", min=1, help="The new total budget.")] = None,
    by: Annotated[int | None, typer.Option("--by", min=1, help="Add this many trials to the budget.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Raise a study's trial budget (a completed study is reopened for workers)."""
    if (n_trials is None) == (by is None):
        fail("give --n-trials N (the new total) or --by K (more trials)")
    study = api.study(name)
    current = int(study.info()["definition"]["budget"]["n_trials"])
    target = n_trials if n_trials is not None else current + (by or 0)
    if target <= current:
        fail(f"--n-trials: {target} does not raise the budget of {current} (lower it with `study set`)")
    output(study.update({"budget": {"n_trials": target}}), as_json, _study_line)


@api_command(study_app, "set")
def study_set(
    api: Client,
    name: Name,
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
    change: dict[str, Any] = {"budget": budget} if budget else {}
    if priority is not None:
        change["priority"] = priority
    tags = _tags(tag or [], untag or [])
    if tags:
        change["tags"] = tags
    if not change:
        fail("nothing to change: give --n-trials, --priority, --max-parallel, --tag, ...")
    output(api.study(name).update(change), as_json, _study_line)


@api_command(study_app, "enqueue")
def study_enqueue(
    api: Client,
    name: Name,
    file: Annotated[
        Path,
        typer.Option(
            "-f",
            "--file",
            help="YAML/JSON: parameter sets (decoded names), or {params, value|values} to import results.",
        ),
    ],
    as_json: JsonFlag = False,
) -> None:
    """Enqueue parameter sets (handed out before new samples), or import them with known values."""
    items = [doc if isinstance(doc.get("params"), dict) else {"params": doc} for doc in read_documents(file)]
    added = api.study(name).enqueue(items)
    if as_json:
        print_json(added)
        return
    imported = sum(1 for t in added["items"] if t.get("value") is not None or t.get("values"))
    say(f"study {safe(name)}: {added['total'] - imported} enqueued, {imported} imported")
    print_trials(added["items"])


@api_command(study_app, "watch")
def study_watch(
    api: Client,
    name: Name,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls.")] = 2.0,
) -> None:
    """A live progress bar with the best value so far, until the study completes, fails or stops."""
    handle = api.study(name)
    study = handle.info()  # before the bar: a missing study or service is one line, no bar
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(name, total=None)
        while True:
            counts = study["trial_counts"]
            progress.update(
                task,
                total=study["definition"]["budget"]["n_trials"],
                completed=counts["complete"] + counts["pruned"],
                description=f"{safe(name)} ({study['state']}) running {counts['running']}, "
                f"best {best_text(study) or '-'}",
            )
            if study["state"] in FINAL_STATES:
                break
            time.sleep(interval)
            study = handle.info()
    say(f"study {safe(name)} {study['state']}: best {best_text(study) or '-'}")


@api_command(study_app, "checkpoint")
def study_checkpoint(
    api: Client,
    name: Name,
    trial: Annotated[
        int | None, typer.Option(help="Trial number (default: the best with a checkpoint).")
    ] = None,
    output_path: Output = None,
) -> None:
    """Download a trained checkpoint (the best trial's by default)."""
    number, filename, content = api.study(name).checkpoint(trial)
    _write(content, output_path, Path(f"{name}-trial{number}-{filename}"), f"trial {number} checkpoint")


@api_command(study_app, "artifacts")
def study_artifacts(api: Client, name: Name, trial: TrialNumber, as_json: JsonFlag = False) -> None:
    """List the files stored with a trial (checkpoint.pt, trial.log, uploads)."""

    def show(items: list[dict[str, Any]]) -> None:
        table = Table("file", "artifact id")
        for item in items:
            table.add_row(safe(item["filename"]), item["artifact_id"])
        console.print(table)

    output(api.study(name).artifacts(trial), as_json, show)


@api_command(study_app, "download")
def study_download(
    api: Client,
    name: Name,
    filename: Annotated[str, typer.Argument(help="The file's name, e.g. trial.log.")],
    trial: TrialNumber,
    output_path: Output = None,
) -> None:
    """Download a file stored with a trial (a log to the terminal: `... trial.log --trial N -o -`)."""
    content = api.study(name).download(trial, filename)
    _write(content, output_path, Path(f"{name}-trial{trial}-{filename}"), f"trial {trial} {safe(filename)}")
