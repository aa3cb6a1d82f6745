"""optuna-dashboard inside the service, on the same storage and behind the same auth.

optuna-dashboard is a Bottle (WSGI) application whose frontend uses absolute paths:
``/dashboard[/...]`` (the single-page app), ``/static/...`` (its bundle), ``/api/...`` (its JSON
API: ``/api/meta``, ``/api/studies``, ...), ``/csv/...``, ``/artifacts/...`` and
``/favicon.ico``. :class:`DashboardMount` sends exactly those paths to the dashboard (wrapped for
ASGI by a2wsgi), everything else -- ``/api/v1/...`` above all -- to caviar.

Two dashboard writes would break caviar's invariants and are refused for caviar's studies with
409: deleting a study (``DELETE /api/studies/{id}``; use ``DELETE /api/v1/studies/{name}``) and
renaming one (the caviar study and the Optuna study share their name). Other writes (notes,
user attributes, telling a trial from the UI, creating a plain Optuna study) go through.

A study or trial id in a dashboard path that does not exist is answered 404 here (optuna-dashboard
answers 500 for most of them). Stored files (``GET /artifacts/...``) are served here, as downloads
with :func:`~caviar.service.web_security.file_headers` (optuna-dashboard would serve an uploaded
``.html`` as a page of this origin, with ``Access-Control-Allow-Origin: *``). The dashboard's CSV
export has its formula-like cells escaped (:func:`~caviar.service.trials.export.escape_csv`).
A caviar study's page shows its state and why caviar paused or stopped it (``caviar:state``,
``caviar:reason``) first among its user attributes.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from optuna.artifacts.exceptions import ArtifactNotFound
from sqlalchemy import select
from starlette._utils import get_route_path
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from caviar.service.config import Settings
from caviar.service.dashboard_guard import MAX_DASHBOARD_BODY, PLOT, body_model, body_refusal, plots_available
from caviar.service.db import Database
from caviar.service.envelope import error_response
from caviar.service.security import secure
from caviar.service.store import ARTIFACTS_ATTR_PREFIX, artifact_store, study_of_trial
from caviar.service.trials.export import escape_csv
from caviar.service.web_security import file_headers
from caviar.storage import StudyRecord

DASHBOARD_ARTIFACTS_ATTR_PREFIX = "dashboard:artifacts:"
"""Where older optuna-dashboards kept a trial's file metadata (a study system attribute)."""

_DASHBOARD_PREFIXES = ("/dashboard/", "/static/", "/csv/", "/artifacts/", "/api/")
_DASHBOARD_EXACT = frozenset({"/dashboard", "/favicon.ico"})
_STUDY_WRITE = re.compile(r"^/api/studies/(-?\d+)(/rename)?/?$")
_TRIAL_WRITE = re.compile(r"^/api/trials/(-?\d+)/(tell|user-attrs)/?$")
_MAX_ID = 2**31 - 1
"""Optuna's ids are 32-bit integers: a larger one names nothing (and PostgreSQL refuses to compare it);
optuna-dashboard's routes take negative ones too, which name nothing either."""

_STUDY_ID = re.compile(r"^/(?:api/studies|api/artifacts|artifacts|csv)/(-?\d+)(?:/|$)")
"""Every optuna-dashboard route whose first number is a study id."""
_TRIAL_ID = re.compile(r"^/(?:api/trials/(-?\d+)(?:/|$)|api/studies/-?\d+/(-?\d+)/(?:skip|note)/?$)")
"""Routes that name a trial: ``/api/trials/{trial}/...``, ``/api/studies/{study}/{trial}/skip|note``."""
_ARTIFACT_TRIAL_ID = {
    "GET": re.compile(r"^/artifacts/-?\d+/(-?\d+)/[0-9a-fA-F-]+/?$"),
    "POST": re.compile(r"^/api/artifacts/-?\d+/(-?\d+)/?$"),
    "DELETE": re.compile(r"^/api/artifacts/-?\d+/(-?\d+)/[0-9a-fA-F-]+/?$"),
}
"""Artifact routes that name a trial (``/api/artifacts/{study}/{x}`` is a study's file for DELETE)."""
_FILE = re.compile(r"^/artifacts/(-?\d+)/(?:(-?\d+)/)?([0-9a-fA-F-]+)/?$")
"""optuna-dashboard's file downloads: ``/artifacts/{study}[/{trial}]/{artifact}``."""
_CSV = re.compile(r"^/csv/-?\d+/?$")
_DETAIL = re.compile(r"^/api/studies/(\d+)/?$")
"""A study's detail: what the study page shows (caviar adds its state and pause reason)."""


def is_dashboard_path(path: str) -> bool:
    """Whether ``path`` belongs to optuna-dashboard (not to caviar's ``/api/v1``)."""
    if path in _DASHBOARD_EXACT:
        return True
    if path == "/api/v1" or path.startswith("/api/v1/"):
        return False
    return path.startswith(_DASHBOARD_PREFIXES)


def named_ids(method: str, path: str) -> tuple[int | None, int | None]:
    """The Optuna study id and trial id a dashboard request names (None where it names none)."""
    study = _STUDY_ID.match(path)
    trial: re.Match[str] | None = _TRIAL_ID.match(path)
    if trial is None and method in _ARTIFACT_TRIAL_ID:
        trial = _ARTIFACT_TRIAL_ID[method].match(path)
    trial_id = next((group for group in trial.groups() if group is not None), None) if trial else None
    return (int(study.group(1)) if study else None), (int(trial_id) if trial_id is not None else None)


def _guarded_study(method: str, path: str) -> int | None:
    """The Optuna study id a dashboard delete/rename targets, else None."""
    match = _STUDY_WRITE.match(path)
    if match is None:
        return None
    renaming = match.group(2) is not None
    if (method == "DELETE" and not renaming) or (method == "POST" and renaming):
        return int(match.group(1))
    return None


class DashboardMount:
    """Route optuna-dashboard's paths to the dashboard, the rest to ``app``.

    Args:
        app: caviar's application (None: every path goes to the dashboard).
        db: the database whose Optuna storage the dashboard shows.
    """

    def __init__(self, app: ASGIApp | None, db: Database, artifact_dir: str) -> None:
        self.app = app
        self.db = db
        self.artifact_dir = artifact_dir
        self._dashboard: ASGIApp | None = None
        self._lock = threading.Lock()

    def dashboard(self) -> ASGIApp:
        """The dashboard as an ASGI application (built on first use: importing it takes a while)."""
        if self._dashboard is None:
            with self._lock:
                if self._dashboard is None:
                    self._dashboard = build_dashboard(self.db, self.artifact_dir)
        return self._dashboard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (self.app is None or is_dashboard_path(get_route_path(scope))):
            method, path = scope["method"], get_route_path(scope)
            missing = await anyio.to_thread.run_sync(self._missing, method, path)
            if missing is not None:
                await missing(scope, receive, send)
                return
            file = _FILE.match(path) if method in ("GET", "HEAD") else None
            if file is not None:
                study, trial, artifact_id = file.group(1), file.group(2), file.group(3)
                response = await anyio.to_thread.run_sync(self._file, study, trial, artifact_id)
                await response(scope, receive, send)
                return
            if method == "GET" and _CSV.match(path):
                send = _escaping_csv(send)
            detail = _DETAIL.match(path) if method == "GET" else None
            if detail is not None:
                shown = await anyio.to_thread.run_sync(self._caviar_state, int(detail.group(1)))
                if shown:
                    send = _with_user_attrs(send, shown)
            study_id = _guarded_study(scope["method"], get_route_path(scope))
            if study_id is not None and await anyio.to_thread.run_sync(self._is_caviar_study, study_id):
                response = error_response(
                    409,
                    "caviar_study",
                    "this study is managed by caviar: delete it with DELETE /api/v1/studies/{name}; "
                    "it cannot be renamed",
                )
                await response(scope, receive, send)
                return
            if not any(key == b"accept-encoding" for key, _ in scope["headers"]):
                # optuna-dashboard reads this header unconditionally (a KeyError, i.e. a 500, without it)
                scope = {**scope, "headers": [*scope["headers"], (b"accept-encoding", b"identity")]}
            if method == "GET" and PLOT.match(path) and not plots_available():
                message = "server-side plots need plotly, which this service lacks"
                await error_response(404, "plot_unavailable", message)(scope, receive, send)
                return
            if body_model(method, path) is not None:
                body = await _read_body(receive, MAX_DASHBOARD_BODY)
                refusal = await anyio.to_thread.run_sync(self._check_write, method, path, body)
                if refusal is not None:
                    await refusal(scope, receive, send)
                    return
                receive = _replay(body or b"")
            await self.dashboard()(scope, receive, send)
            return
        if self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "lifespan":  # the standalone dashboard has nothing to start
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

    def _missing(self, method: str, path: str) -> JSONResponse | None:
        """A 404 in the envelope when the study or trial the path names does not exist."""
        study_id, trial_id = named_ids(method, path)
        if study_id is not None and not self._study_exists(study_id):
            return error_response(404, "study_not_found", f"no study with id {study_id}")
        if trial_id is not None and not self._trial_exists(trial_id):
            return error_response(404, "trial_not_found", f"no trial with id {trial_id}")
        return None

    def _study_exists(self, study_id: int) -> bool:
        if not 0 <= study_id <= _MAX_ID:
            return False
        try:
            self.db.optuna.get_study_name_from_id(study_id)
        except KeyError:
            return False
        return True

    def _trial_exists(self, trial_id: int) -> bool:
        if not 0 <= trial_id <= _MAX_ID:
            return False
        try:
            self.db.optuna.get_trial(trial_id)
        except KeyError:
            return False
        return True

    def _file(self, study: str, trial: str | None, artifact_id: str) -> Response:
        """A stored file (a study's or a trial's) as a download, or a 404 in the envelope.

        Where optuna-dashboard looks: a trial's system attribute ``artifacts:{id}`` (Optuna's
        ``upload_artifact``), the study's ``dashboard:artifacts:{trial}:{id}`` (older dashboards),
        or for a study's file the study's ``artifacts:{id}``.
        """
        study_attrs = self.db.optuna.get_study_system_attrs(int(study))
        if trial is None:
            meta = study_attrs.get(ARTIFACTS_ATTR_PREFIX + artifact_id)
        else:
            meta = study_attrs.get(f"{DASHBOARD_ARTIFACTS_ATTR_PREFIX}{trial}:{artifact_id}")
            if meta is None:
                meta = self.db.optuna.get_trial_system_attrs(int(trial)).get(
                    ARTIFACTS_ATTR_PREFIX + artifact_id
                )
        filename = None
        try:
            found = json.loads(meta) if isinstance(meta, str) else None
            if isinstance(found, dict):
                filename = str(found.get("filename") or "") or None
                reader = artifact_store(self.artifact_dir).open_reader(artifact_id)
            else:
                found = None
        except (ValueError, ArtifactNotFound):
            found = None
        if found is None:
            return error_response(404, "artifact_not_found", f"no stored file with id {artifact_id[:64]!r}")
        return StreamingResponse(reader, headers=file_headers(filename))

    def _check_write(self, method: str, path: str, body: bytes | None) -> JSONResponse | None:
        """A dashboard write's body as its route takes it (:mod:`caviar.service.dashboard_guard`),
        and a trial's tell or user attributes only while it runs (Optuna raises, a 500, otherwise)."""
        if body is None:
            return error_response(413, "payload_too_large", "the body is too large")
        refused = body_refusal(method, path, body)
        if refused is not None:
            field, message = refused
            return error_response(422, "validation_error", message, [{"field": field}])
        trial_write = _TRIAL_WRITE.match(path) if method == "POST" else None
        if trial_write is None:
            return None
        trial_id = int(trial_write.group(1))
        try:
            if self.db.optuna.get_trial(trial_id).state.is_finished():
                return error_response(409, "trial_finished", f"trial {trial_id} has finished")
        except KeyError:
            return None  # answered 404 before
        return self._check_tell(trial_id, body) if trial_write.group(2) == "tell" else None

    def _check_tell(self, trial_id: int, body: bytes) -> JSONResponse | None:
        """A dashboard tell must give one value per objective (Optuna raises, a 500, otherwise)."""
        data = json.loads(body)
        values, state = data.get("values"), str(data.get("state", "")).lower()
        with self.db.session() as session:  # Optuna's storage API has no trial -> study lookup
            study_id = study_of_trial(session, trial_id)
        if study_id is None:
            return None  # the dashboard answers 404 itself
        n_objectives = len(self.db.optuna.get_study_directions(study_id))
        if state == "complete" and isinstance(values, list) and len(values) != n_objectives:
            return error_response(
                422,
                "wrong_number_of_values",
                f"values: the study has {n_objectives} objective(s), got {len(values)} value(s)",
            )
        return None

    def _caviar_state(self, optuna_study_id: int) -> list[dict[str, str]]:
        """What the study page shows of a caviar study's state: the state, and why caviar paused or
        stopped it (a setup error, say), as the first rows of "Study User Attributes"."""
        with self.db.session() as session:
            row = session.execute(
                select(StudyRecord.state, StudyRecord.stop_reason).where(
                    StudyRecord.optuna_study_id == optuna_study_id
                )
            ).first()
        if row is None:
            return []
        shown = [{"key": "caviar:state", "value": str(row.state)}]
        if row.stop_reason:
            shown.append({"key": "caviar:reason", "value": str(row.stop_reason)})
        return shown

    def _is_caviar_study(self, optuna_study_id: int) -> bool:
        with self.db.session() as session:
            found = session.scalar(
                select(StudyRecord.id).where(StudyRecord.optuna_study_id == optuna_study_id)
            )
        return found is not None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body (None when it is longer than ``limit``)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _rewriting_send(
    send: Send, content_type: bytes, rewrite: Callable[[bytes], bytes], *, answer_type: bytes | None = None
) -> Send:
    """A ``send`` that passes a 2xx answer of ``content_type`` through ``rewrite`` as a whole (the
    dashboard builds its answers in memory too), with its ``content-length`` set anew and, given
    ``answer_type``, its ``content-type`` replaced."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def rewriting_send(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            kind = dict(message.get("headers", [])).get(b"content-type", b"")
            if 200 <= message["status"] < 300 and kind.startswith(content_type):
                start = message
                return
        elif start is not None and message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = rewrite(b"".join(chunks))
            replaced = (b"content-length", b"content-type") if answer_type else (b"content-length",)
            headers = [(key, value) for key, value in start.get("headers", []) if key not in replaced]
            if answer_type:
                headers.append((b"content-type", answer_type))
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        await send(message)

    return rewriting_send


def _escaping_csv(send: Send) -> Send:
    """A ``send`` that escapes the formula-like cells of a CSV answer (a 2xx ``text/csv`` one)."""
    return _rewriting_send(
        send,
        b"text/csv",
        lambda body: escape_csv(body.decode("utf-8")).encode("utf-8"),
        answer_type=b"text/csv; charset=utf-8",
    )


def _with_user_attrs(send: Send, shown: list[dict[str, str]]) -> Send:
    """A ``send`` that puts ``shown`` first in a study detail's ``user_attrs`` (a 2xx JSON answer)."""

    def add(body: bytes) -> bytes:
        try:
            detail = json.loads(body)
            detail["user_attrs"] = [*shown, *detail.get("user_attrs", [])]
            return json.dumps(detail).encode("utf-8")
        except (ValueError, TypeError, AttributeError):
            return body  # not a study detail: passed on as it came

    return _rewriting_send(send, b"application/json", add)


def _replay(body: bytes) -> Receive:
    """A ``receive`` that hands the already read body on."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def build_dashboard(db: Database, artifact_dir: str) -> ASGIApp:
    """optuna-dashboard's WSGI app on ``db``'s Optuna storage and the trials' artifact store."""
    # lazy: optuna-dashboard and its WSGI stack load on the first dashboard request, not at start
    import optuna_dashboard
    from a2wsgi import WSGIMiddleware

    wsgi: Any = optuna_dashboard.wsgi(storage=db.optuna, artifact_store=artifact_store(artifact_dir))
    asgi: ASGIApp = WSGIMiddleware(wsgi)  # type: ignore[assignment]
    return asgi


def create_dashboard_app(settings: Settings, db: Database) -> ASGIApp:
    """The standalone dashboard of ``caviar dashboard``: every path goes to optuna-dashboard,
    behind the same body cap and auth as the API."""
    return secure(DashboardMount(None, db, settings.artifact_dir), settings, db)
