"""Where CLI commands get their data: the local database, or a caviar service over REST.

:class:`~caviar.service.local.LocalBackend` calls the domain functions on the database;
:class:`~caviar.service.remote.RemoteBackend` makes the same calls through ``/api/v1``. Both
return the API's JSON shapes (plain dicts) and raise an error carrying the API's error code and
message, so every command has one body for both.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Protocol

PAGE = 1000


class Backend(Protocol):
    """The operations the CLI needs."""

    # ---- studies -------------------------------------------------------------------------

    def check_definitions(self, documents: list[dict[str, Any]]) -> None:
        """Validate definitions before creating any (locally; a remote service checks each one)."""
        ...

    def create_study(self, document: dict[str, Any]) -> dict[str, Any]:
        """Create a study from a definition; returns it."""
        ...

    def list_studies(
        self, *, state: str | None = None, tag: str | None = None, limit: int = 100, queue: bool = False
    ) -> dict[str, Any]:
        """A page of studies, newest first (or queued/running ones in queue order): ``{items, total}``."""
        ...

    def study(self, name: str) -> dict[str, Any]:
        """One study."""
        ...

    def trials(self, name: str, *, state: str | None = None) -> list[dict[str, Any]]:
        """Every trial of a study (in the given state), ordered by number."""
        ...

    def best(self, name: str) -> dict[str, Any]:
        """The best trial, or ``{"trials": [...]}`` (the Pareto front) for several objectives."""
        ...

    def refine(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        """Create the coarse-to-fine follow-up study; returns it."""
        ...

    def checkpoint(self, name: str, number: int | None) -> tuple[int, str, bytes]:
        """A trial's checkpoint (default: the best trial's): ``(number, filename, content)``."""
        ...

    def artifacts(self, name: str, number: int) -> list[dict[str, Any]]:
        """The files stored with a trial: ``[{artifact_id, filename}]``."""
        ...

    def download(self, name: str, number: int, filename: str) -> bytes:
        """The newest file named ``filename`` stored with a trial."""
        ...

    def workers(self) -> dict[str, Any]:
        """Registered workers: ``{items, total}``."""
        ...

    # ---- schedules -----------------------------------------------------------------------

    def add_schedules(self, documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Create schedules (locally every document is checked before any is created)."""
        ...

    def list_schedules(self) -> dict[str, Any]: ...

    def schedule(self, ref: str) -> dict[str, Any]: ...

    def update_schedule(self, ref: str, change: dict[str, Any]) -> dict[str, Any]: ...

    def run_schedule(self, ref: str) -> dict[str, Any]: ...

    def schedule_runs(self, ref: str, *, limit: int) -> dict[str, Any]: ...

    def delete_schedule(self, ref: str) -> None: ...

    # ---- tokens --------------------------------------------------------------------------

    def create_token(self, scope: str, name: str | None) -> dict[str, Any]: ...

    def list_tokens(self, *, include_revoked: bool) -> dict[str, Any]: ...

    def revoke_token(self, token_id: int) -> None: ...

    def close(self) -> None:
        """Release connections."""
        ...


def trials_csv(trials: list[dict[str, Any]]) -> str:
    """Trials as CSV: one row per trial, one ``params.<name>`` column per parameter."""
    params = sorted({name for trial in trials for name in trial["params"]})
    width = max((len(trial["values"] or []) for trial in trials), default=0)
    value_columns = ["value"] if width <= 1 else [f"values.{i}" for i in range(width)]
    columns = ["number", "state", *value_columns, *(f"params.{p}" for p in params)]
    columns += ["worker_id", "started_at", "finished_at", "retry_of"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for trial in trials:
        values = trial["values"] or ([trial["value"]] if trial["value"] is not None else [])
        if width <= 1:
            value_cells = [trial["value"] if trial["value"] is not None else ""]
        else:
            value_cells = [*values, *[""] * (width - len(values))]
        row = [trial["number"], trial["state"], *value_cells]
        row += [_cell(trial["params"].get(p)) for p in params]
        row += [
            trial[key] if trial[key] is not None else "" for key in ("worker_id", "started_at", "finished_at")
        ]
        row.append(trial["retry_of"] if trial["retry_of"] is not None else "")
        writer.writerow(row)
    return out.getvalue()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (dict, list)) else value
