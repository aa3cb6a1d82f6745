"""Where CLI commands get their data: the local database, or a caviar service over REST.

:class:`~caviar.service.local.LocalBackend` calls the domain functions on the database;
:class:`~caviar.service.remote.RemoteBackend` makes the same calls through ``/api/v1``. Both
return the API's JSON shapes (plain dicts) and raise an error carrying the API's error code and
message, so every command has one body for both.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        self,
        *,
        state: str | None = None,
        tags: Sequence[str] = (),
        limit: int = 100,
        queue: bool = False,
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

    def update_study(self, name: str, change: dict[str, Any]) -> dict[str, Any]:
        """Edit a study's budget, priority or tags (a JSON merge patch); returns it."""
        ...

    def pause_study(self, name: str) -> dict[str, Any]: ...

    def resume_study(self, name: str) -> dict[str, Any]: ...

    def stop_study(self, name: str, reason: str | None) -> dict[str, Any]:
        """Stop a study (stopping while trials run, then stopped); returns it."""
        ...

    def delete_study(self, name: str) -> None:
        """Delete a study, its trials and the files stored with them."""
        ...

    def enqueue(self, name: str, trials: list[dict[str, Any]]) -> dict[str, Any]:
        """Enqueue parameter sets (or import them with known values): ``{items, total}``."""
        ...

    def importances(self, name: str) -> dict[str, Any]:
        """``{"importances": {param: x}}``, or ``{metric: {param: x}}`` for several objectives."""
        ...

    def export(self, name: str, fmt: str) -> str:
        """Every trial as CSV or JSON text."""
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
