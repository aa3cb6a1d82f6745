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
"""

from __future__ import annotations

import re
import threading
from typing import Any

import anyio.to_thread
from sqlalchemy import select
from starlette._utils import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.envelope import error_response
from caviar.service.security import secure
from caviar.storage import StudyRecord

_DASHBOARD_PREFIXES = ("/dashboard/", "/static/", "/csv/", "/artifacts/", "/api/")
_DASHBOARD_EXACT = frozenset({"/dashboard", "/favicon.ico"})
_STUDY_WRITE = re.compile(r"^/api/studies/(\d+)(/rename)?/?$")


def is_dashboard_path(path: str) -> bool:
    """Whether ``path`` belongs to optuna-dashboard (not to caviar's ``/api/v1``)."""
    if path in _DASHBOARD_EXACT:
        return True
    if path == "/api/v1" or path.startswith("/api/v1/"):
        return False
    return path.startswith(_DASHBOARD_PREFIXES)


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

    def __init__(self, app: ASGIApp | None, db: Database) -> None:
        self.app = app
        self.db = db
        self._dashboard: ASGIApp | None = None
        self._lock = threading.Lock()

    def dashboard(self) -> ASGIApp:
        """The dashboard as an ASGI application (built on first use: importing it takes a while)."""
        if self._dashboard is None:
            with self._lock:
                if self._dashboard is None:
                    self._dashboard = build_dashboard(self.db)
        return self._dashboard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (self.app is None or is_dashboard_path(get_route_path(scope))):
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
            await self.dashboard()(scope, receive, send)
            return
        if self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "lifespan":  # the standalone dashboard has nothing to start
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

    def _is_caviar_study(self, optuna_study_id: int) -> bool:
        with self.db.session() as session:
            found = session.scalar(
                select(StudyRecord.id).where(StudyRecord.optuna_study_id == optuna_study_id)
            )
        return found is not None


def build_dashboard(db: Database) -> ASGIApp:
    """optuna-dashboard's WSGI app on ``db``'s Optuna storage, wrapped for ASGI."""
    # lazy: optuna-dashboard and its WSGI stack load on the first dashboard request, not at start
    import optuna_dashboard
    from a2wsgi import WSGIMiddleware

    wsgi: Any = optuna_dashboard.wsgi(storage=db.optuna)
    asgi: ASGIApp = WSGIMiddleware(wsgi)  # type: ignore[assignment]
    return asgi


def create_dashboard_app(settings: Settings, db: Database) -> ASGIApp:
    """The standalone dashboard of ``caviar dashboard``: every path goes to optuna-dashboard,
    behind the same body cap and auth as the API."""
    return secure(DashboardMount(None, db), settings, db)
