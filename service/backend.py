"""Where CLI commands get their data: the local database, or a caviar service over REST.

:class:`LocalBackend` calls the domain functions on a :class:`~service.db.Database`;
:class:`RemoteBackend` calls the same operations through ``/api/v1`` with httpx. Both return the
API's JSON shapes (plain dicts) and raise :class:`~service.errors.CaviarError` with the API's
error code and message, so every command has one body for both.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Protocol

import httpx

from service.errors import CaviarError

PAGE = 1000


class Backend(Protocol):
    """The study operations the CLI needs."""

    def check_definitions(self, documents: list[dict[str, Any]]) -> None:
        """Validate definitions before creating any (locally; a remote service checks each one)."""
        ...

    def create_study(self, document: dict[str, Any]) -> dict[str, Any]:
        """Create a study from a definition; returns it."""
        ...

    def list_studies(self, *, state: str | None, tag: str | None, limit: int) -> dict[str, Any]:
        """A page of studies, newest first: ``{"items", "total"}``."""
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

    def close(self) -> None:
        """Release connections."""
        ...


class LocalBackend:
    """Study operations on the local database.

    Args:
        database_url: SQLAlchemy URL (default: from the environment).
    """

    def __init__(self, database_url: str | None) -> None:
        from service.config import Settings
        from service.db import Database

        settings = Settings(database_url=database_url) if database_url else Settings()
        self.db = Database(settings.database_url)

    def check_definitions(self, documents: list[dict[str, Any]]) -> None:
        from service.studies import service

        for doc in documents:
            service.parse_definition(doc)

    def create_study(self, document: dict[str, Any]) -> dict[str, Any]:
        from service.studies import service

        record = service.create_study(self.db, service.parse_definition(document))
        return service.describe(self.db, record, trials=[]).model_dump(mode="json")

    def list_studies(self, *, state: str | None, tag: str | None, limit: int) -> dict[str, Any]:
        from service.studies import service

        return service.list_studies(self.db, state=state, tag=tag, limit=limit).model_dump(mode="json")

    def study(self, name: str) -> dict[str, Any]:
        from service.studies import service

        return service.describe(self.db, service.load_record(self.db, name)).model_dump(mode="json")

    def trials(self, name: str, *, state: str | None = None) -> list[dict[str, Any]]:
        from service.trials import service

        items: list[dict[str, Any]] = []
        while True:
            page = service.list_trials(self.db, name, state=state, limit=PAGE, offset=len(items))
            items += [trial.model_dump(mode="json") for trial in page.items]
            if not page.items or len(items) >= page.total:
                return items

    def best(self, name: str) -> dict[str, Any]:
        from service.trials import service

        return service.best(self.db, name).model_dump(mode="json")

    def refine(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        from service.studies import service as studies
        from service.trials import service
        from service.trials.schemas import RefineRequest

        request = RefineRequest.model_validate(options)
        record = service.refine(self.db, name, **request.model_dump())
        return studies.describe(self.db, record, trials=[]).model_dump(mode="json")

    def close(self) -> None:
        self.db.dispose()


class RemoteBackend:
    """Study operations through a caviar service's REST API.

    Args:
        url: the service's base URL (``http://host:8000``).
        token: a bearer token (read scope for reads, write scope to create and refine).
        timeout_s: per-request timeout.
        transport: an httpx transport (tests pass an ASGI one).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.client = httpx.Client(
            base_url=self.url + "/api/v1", headers=headers, timeout=timeout_s, transport=transport
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CaviarError(f"cannot reach {self.url}: {type(exc).__name__}", code="unreachable") from None
        if response.is_success:
            return response.json()
        try:
            error = response.json()["error"]
            message, code = str(error["message"]), str(error["code"])
        except (ValueError, KeyError, TypeError):
            message, code = f"{self.url} answered HTTP {response.status_code}", "http_error"
        raise CaviarError(message, code=code)

    def check_definitions(self, documents: list[dict[str, Any]]) -> None:
        return None

    def create_study(self, document: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", "/studies", json=document))

    def list_studies(self, *, state: str | None, tag: str | None, limit: int) -> dict[str, Any]:
        params = {key: value for key, value in {"state": state, "tag": tag, "limit": limit}.items() if value}
        return dict(self._call("GET", "/studies", params=params))

    def study(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/studies/{name}"))

    def trials(self, name: str, *, state: str | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            params: dict[str, Any] = {"limit": PAGE, "offset": len(items)} | (
                {"state": state} if state else {}
            )
            page = self._call("GET", f"/studies/{name}/trials", params=params)
            items += page["items"]
            if not page["items"] or len(items) >= page["total"]:
                return items

    def best(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/studies/{name}/best"))

    def refine(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", f"/studies/{name}/refine", json=options))

    def close(self) -> None:
        self.client.close()


def open_backend(url: str | None, token: str | None, database_url: str | None) -> Backend:
    """The remote backend when a URL is given, else the local database."""
    if url:
        return RemoteBackend(url, token)
    return LocalBackend(database_url)


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
