"""The FastAPI application factory: routers, the error envelope, lifespan tasks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import optuna
from fastapi import APIRouter, FastAPI, Request

from caviar.service.background import PeriodicTask
from caviar.service.config import Settings, get_settings
from caviar.service.dashboard import DashboardMount
from caviar.service.db import Database
from caviar.service.envelope import error_response, error_responses, install_error_handlers
from caviar.service.metrics import RequestMiddleware
from caviar.service.metrics import router as metrics_router
from caviar.service.schedules.router import router as schedules_router
from caviar.service.schedules.service import scheduler_task
from caviar.service.security import install_security
from caviar.service.studies.router import router as studies_router
from caviar.service.tokens.router import router as tokens_router
from caviar.service.trials import reap
from caviar.service.trials.router import router as trials_router
from caviar.service.workers.router import router as workers_router

_log = logging.getLogger("caviar.api")


def background_tasks(db: Database, settings: Settings) -> list[PeriodicTask]:
    """The periodic work each server process runs (each is safe to run in every replica)."""
    tasks: list[PeriodicTask] = []
    if settings.background_tasks:
        tasks.append(PeriodicTask("reaper", settings.reap_every_s, lambda: reap(db)))
        tasks.append(scheduler_task(db, settings))
    return tasks


def create_app(settings: Settings | None = None, *, db: Database | None = None) -> FastAPI:
    """Build the caviar API.

    Args:
        settings: configuration (default: from the environment).
        db: an already open database handle (tests share one); default: opened from settings.
    """
    settings = settings or get_settings()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [task.start() for task in background_tasks(app.state.db, settings)]
        try:
            yield
        finally:
            for task in tasks:
                task.stop()
            if db is None:
                app.state.db.dispose()

    app = FastAPI(
        title="caviar",
        version="0.1.0",
        summary="Hyperparameter tuning service for PyTorch models, over Optuna.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.db = db or Database(settings.database_url)
    install_error_handlers(app)
    app.add_middleware(DashboardMount, db=app.state.db)  # innermost: /dashboard, /static, /api/<not v1>
    install_security(app, settings, app.state.db)  # body cap, then auth (with a token), then CORS
    app.add_middleware(RequestMiddleware)  # outermost: times, counts and logs every answer

    @app.get("/healthz", tags=["health"], responses=error_responses(503))
    def healthz(request: Request) -> Any:
        try:
            request.app.state.db.ping()
        except Exception as exc:
            _log.warning("health check failed: %s", type(exc).__name__)
            return error_response(503, "database_unreachable", "the database cannot be reached")
        return {"status": "ok"}

    app.include_router(metrics_router)
    api = APIRouter(prefix="/api/v1", responses=error_responses(401, 403, 404, 409, 413, 422))
    api.include_router(studies_router)
    api.include_router(trials_router)
    api.include_router(workers_router)
    api.include_router(schedules_router)
    api.include_router(tokens_router)
    app.include_router(api)
    return app
