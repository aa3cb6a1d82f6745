"""The FastAPI application factory: routers, the error envelope, lifespan tasks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import optuna
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.background import PeriodicTask
from service.config import Settings, get_settings
from service.dashboard import DashboardMount
from service.db import Database
from service.errors import CaviarError, RateLimited, validation_details
from service.metrics import MetricsMiddleware
from service.metrics import router as metrics_router
from service.schedules.router import router as schedules_router
from service.schedules.service import scheduler_task
from service.schemas import error_responses
from service.security import install_security
from service.studies.router import router as studies_router
from service.tokens.router import router as tokens_router
from service.trials.router import router as trials_router
from service.trials.service import reap
from service.workers.router import router as workers_router

_log = logging.getLogger("caviar.api")


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The one error envelope: ``{"error": {"code", "message", "details"}}``."""
    body = {"error": {"code": code, "message": message, "details": details or []}}
    return JSONResponse(body, status_code=status, headers=headers or None)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
}


_BODY_PARSE_ERROR = "There was an error parsing the body"
"""FastAPI's 400 for a body it cannot decode: answered as the 422 of any other malformed JSON."""


def install_error_handlers(app: FastAPI) -> None:
    """Map domain errors, validation errors and Starlette's HTTP errors onto the envelope."""

    @app.exception_handler(CaviarError)
    async def _domain(_: Request, exc: CaviarError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, RateLimited) else {}
        return error_response(exc.status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = validation_details(exc.errors())
        first = details[0] if details else {"field": "", "message": "invalid request"}
        if first.get("type") == "json_invalid":
            message = "request body is not valid JSON"
        else:
            message = f"{first['field'] or 'body'}: {first['message']}"
        return error_response(422, "validation_error", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _BODY_PARSE_ERROR:  # e.g. a body that is not UTF-8
            return error_response(422, "validation_error", "request body is not valid JSON")
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        headers = dict(exc.headers or {})
        return error_response(exc.status_code, code, message, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            500, "internal_error", "internal server error (this is a bug; see the server log)"
        )


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
    app.add_middleware(MetricsMiddleware)  # outermost: times and counts every answer

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
