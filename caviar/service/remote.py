"""The CLI's remote backend: every CLI operation through a caviar service's REST API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from caviar._http import HttpClient
from caviar._http import api_path as _path
from caviar.service.backend import PAGE


class RemoteBackend:
    """Every CLI operation through ``/api/v1`` of a caviar service.

    Args:
        url: the service's base URL (``http://host:8000``).
        token: a bearer token (read scope for reads, write to change things, admin for tokens).
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
        # a person waits at the terminal: retry through a short outage, then say so
        self.http = HttpClient(url, token or "", timeout_s=timeout_s, retry_s=10.0, transport=transport)

    def _get(self, *parts: str | int, **params: Any) -> Any:
        return self.http.get(_path(*parts), params={k: v for k, v in params.items() if v is not None} or None)

    def _post(self, *parts: str | int, json: Any = None) -> Any:
        return self.http.post(_path(*parts), json=json)

    # ---- studies -------------------------------------------------------------------------

    def check_definitions(self, documents: list[dict[str, Any]]) -> None:
        return None  # the service checks each definition as it creates it

    def create_study(self, document: dict[str, Any]) -> dict[str, Any]:
        return dict(self._post("studies", json=document))

    def list_studies(
        self,
        *,
        state: str | None = None,
        tags: Sequence[str] = (),
        limit: int = 100,
        queue: bool = False,
    ) -> dict[str, Any]:
        if queue:
            return dict(
                self._get("studies", state=["queued", "running"], tag=list(tags), limit=limit, order="queue")
            )
        return dict(self._get("studies", state=state, tag=list(tags), limit=limit))

    def study(self, name: str) -> dict[str, Any]:
        return dict(self._get("studies", name))

    def trials(self, name: str, *, state: str | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            page = self._get("studies", name, "trials", limit=PAGE, offset=len(items), state=state)
            items += page["items"]
            if not page["items"] or len(items) >= page["total"]:
                return items

    def best(self, name: str) -> dict[str, Any]:
        return dict(self._get("studies", name, "best"))

    def refine(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        return dict(self._post("studies", name, "refine", json=options))

    def update_study(self, name: str, change: dict[str, Any]) -> dict[str, Any]:
        return dict(self.http.request("PATCH", _path("studies", name), json=change))

    def pause_study(self, name: str) -> dict[str, Any]:
        return dict(self._post("studies", name, "pause"))

    def resume_study(self, name: str) -> dict[str, Any]:
        return dict(self._post("studies", name, "resume"))

    def stop_study(self, name: str, reason: str | None) -> dict[str, Any]:
        return dict(self._post("studies", name, "stop", json={"reason": reason} if reason else None))

    def delete_study(self, name: str) -> None:
        self.http.request("DELETE", _path("studies", name))

    def enqueue(self, name: str, trials: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(self._post("studies", name, "trials", "enqueue", json={"trials": trials}))

    def importances(self, name: str) -> dict[str, Any]:
        return dict(self._get("studies", name, "importances"))

    def export(self, name: str, fmt: str) -> str:
        response = self.http.send("GET", _path("studies", name, "trials", "export"), params={"format": fmt})
        return response.text

    def checkpoint(self, name: str, number: int | None) -> tuple[int, str, bytes]:
        where = ("checkpoint",) if number is None else ("trials", number, "checkpoint")
        response = self.http.send("GET", _path("studies", name, *where))
        # attachment; filename="<study>-trial<n>-<file>": the trial it came from, then the file
        stored = response.headers.get("content-disposition", "").rpartition("filename=")[2].strip('"')
        trial, _, filename = stored.rpartition("-trial")[2].partition("-")
        return int(trial), filename or "checkpoint.pt", response.content

    def artifacts(self, name: str, number: int) -> list[dict[str, Any]]:
        return list(self._get("studies", name, "trials", number, "artifacts"))

    def download(self, name: str, number: int, filename: str) -> bytes:
        return self.http.send("GET", _path("studies", name, "trials", number, "artifacts", filename)).content

    def workers(self) -> dict[str, Any]:
        return dict(self._get("workers"))

    # ---- schedules -----------------------------------------------------------------------

    def add_schedules(self, documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [dict(self._post("schedules", json=doc)) for doc in documents]

    def list_schedules(self) -> dict[str, Any]:
        return dict(self._get("schedules", limit=1000))

    def schedule(self, ref: str) -> dict[str, Any]:
        return dict(self._get("schedules", ref))

    def update_schedule(self, ref: str, change: dict[str, Any]) -> dict[str, Any]:
        return dict(self.http.request("PATCH", _path("schedules", ref), json=change))

    def run_schedule(self, ref: str) -> dict[str, Any]:
        return dict(self._post("schedules", ref, "run"))

    def schedule_runs(self, ref: str, *, limit: int) -> dict[str, Any]:
        return dict(self._get("schedules", ref, "runs", limit=limit))

    def delete_schedule(self, ref: str) -> None:
        self.http.request("DELETE", _path("schedules", ref))

    # ---- tokens --------------------------------------------------------------------------

    def create_token(self, scope: str, name: str | None) -> dict[str, Any]:
        body = {"scope": scope} | ({"name": name} if name else {})
        return dict(self._post("tokens", json=body))

    def list_tokens(self, *, include_revoked: bool) -> dict[str, Any]:
        return dict(self._get("tokens", include_revoked=str(include_revoked).lower()))

    def revoke_token(self, token_id: int) -> None:
        self.http.request("DELETE", _path("tokens", token_id))

    def close(self) -> None:
        self.http.close()
