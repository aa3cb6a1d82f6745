"""Trial export: every trial of a study as CSV (one row per trial) or JSON (the API's Trial objects)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any, Literal

from caviar.service.db import Database
from caviar.service.store import definition_of, load_record
from caviar.service.trials.reads import list_trials

ExportFormat = Literal["csv", "json"]
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
"""A spreadsheet reads a cell starting with one of these as a formula (``=HYPERLINK(...)``)."""
_FIXED_COLUMNS = ("number", "state", "value", "worker_id", "started_at", "finished_at", "retry_of")


def export_trials(db: Database, name: str, fmt: ExportFormat = "csv") -> str:
    """Every trial of a study, ordered by number, as CSV or as a JSON array of Trial objects."""
    metrics = definition_of(load_record(db, name)).metrics
    trials = [t.model_dump(mode="json") for t in list_trials(db, name, limit=2**31).items]
    if fmt == "json":
        return json.dumps(trials, indent=2) + "\n"
    return trials_csv(trials, metrics)


def trials_csv(trials: Sequence[dict[str, Any]], metrics: Sequence[str] = ()) -> str:
    """Trials (the API's JSON shape) as CSV: one row per trial, one ``params.<name>`` column per parameter.

    A single-objective study has one ``value`` column; a multi-objective one has a column per
    objective named after its metric (``values.<metric>`` when a metric's name is taken by another
    column), or ``values.<i>`` when the metric names are not known.
    """
    params = sorted({name for trial in trials for name in trial["params"]})
    width = max((len(trial["values"] or []) for trial in trials), default=0)
    if width <= 1 and len(metrics) <= 1:
        value_columns = ["value"]
    elif len(metrics) >= width:
        value_columns = [
            m if m not in _FIXED_COLUMNS and not m.startswith("params.") else f"values.{m}" for m in metrics
        ]
    else:
        value_columns = [f"values.{i}" for i in range(width)]
    columns = ["number", "state", *value_columns, *(f"params.{p}" for p in params)]
    columns += ["worker_id", "started_at", "finished_at", "retry_of"]
    out = io.StringIO()
    writer = csv.writer(out)  # RFC 4180 rows (CRLF): a cell holding a CR or LF is quoted
    writer.writerow([csv_safe(column) for column in columns])
    for trial in trials:
        values = trial["values"] or ([trial["value"]] if trial["value"] is not None else [])
        if value_columns == ["value"]:
            value_cells = [trial["value"] if trial["value"] is not None else ""]
        else:
            value_cells = [*values, *[""] * (len(value_columns) - len(values))]
        row = [trial["number"], trial["state"], *value_cells]
        row += [_cell(trial["params"].get(p)) for p in params]
        row += [
            csv_safe(trial[key]) if trial[key] is not None else ""
            for key in ("worker_id", "started_at", "finished_at")
        ]
        row.append(trial["retry_of"] if trial["retry_of"] is not None else "")
        writer.writerow(row)
    return out.getvalue()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return csv_safe(json.dumps(value) if isinstance(value, (dict, list)) else value)


def csv_safe(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting with ``= + - @``, tab or CR gets a ``'`` in front.

    Numbers (and text that is a number, such as ``-0.5``) stay as they are: a spreadsheet reads them
    as numbers, not formulas. This is OWASP's advice on CSV injection.
    """
    if not isinstance(value, str) or not value.startswith(FORMULA_PREFIXES):
        return value
    try:
        float(value)
    except ValueError:
        return "'" + value
    return value


def escape_csv(text: str) -> str:
    """A whole CSV document with every cell passed through :func:`csv_safe` (rows end in CRLF)."""
    out = io.StringIO()
    writer = csv.writer(out)
    for row in csv.reader(io.StringIO(text, newline="")):
        writer.writerow([csv_safe(cell) for cell in row])
    return out.getvalue()
