"""The FastAPI application factory: routers, the error envelope, lifespan tasks."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import optuna
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from caviar.service.background import PeriodicTask
from caviar.service.config import Settings, get_settings
from caviar.service.dashboard import DashboardMount
from caviar.service.db import Database
from caviar.service.definition import preload_samplers
from caviar.service.envelope import error_response, error_responses, install_error_handlers
from caviar.service.metrics import RequestMiddleware, route_templates
from caviar.service.metrics import router as metrics_router
from caviar.service.optuna_api.router import router as optuna_router
from caviar.service.schedules.router import router as schedules_router
from caviar.service.schedules.service import scheduler_task
from caviar.service.security import install_security, open_paths
from caviar.service.studies.router import router as studies_router
from caviar.service.tokens.router import router as tokens_router
from caviar.service.tokens.router import whoami_router
from caviar.service.trials import reap
from caviar.service.trials.admission import AskGate
from caviar.service.trials.router import router as trials_router
from caviar.service.web_security import UNSAFE_METHODS
from caviar.service.workers.router import router as workers_router

_log = logging.getLogger("caviar.api")


def background_tasks(db: Database, settings: Settings) -> list[PeriodicTask]:
    """The periodic work each server process runs (each is safe to run in every replica)."""
    tasks: list[PeriodicTask] = []
    if settings.background_tasks:
        margin_s = settings.reap_margin_s
        tasks.append(PeriodicTask("reaper", settings.reap_every_s, lambda: reap(db, margin_s=margin_s)))
        tasks.append(scheduler_task(db, settings))
    return tasks


def operation_id(route: APIRoute) -> str:
    """A stable operation id from the endpoint's name: ``create_study`` -> ``createStudy``."""
    first, *rest = route.name.split("_")
    return first + "".join(part.capitalize() for part in rest)


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI schema with the bearer token declared (HTTP Basic with the token as password
    works too, for browsers) where the service has one; the open paths (``/healthz``, ``/metrics``
    unless ``metrics_auth``) need none."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            routes=app.routes,
            description=app.description,
        )
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearerToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "A caviar token (CAVIAR_API_TOKEN, or one made by `caviar token create`); "
                "required when the service has CAVIAR_API_TOKEN set.",
            },
            "basicToken": {
                "type": "http",
                "scheme": "basic",
                "description": "Any user; the token as password.",
            },
        }
        if app.state.settings.api_token is not None:  # without a token the service is open
            schema["security"] = [{"bearerToken": []}, {"basicToken": []}]
            for path in open_paths(app.state.settings):
                for operation in schema["paths"].get(path, {}).values():
                    operation["security"] = []
        _add_cross_site_refusals(schema)
        _add_links(schema)
        app.openapi_schema = schema
    return app.openapi_schema


_STUDY_LINKS = (
    "getStudy",
    "askTrial",
    "listTrials",
    "pauseStudy",
    "resumeStudy",
    "bestTrial",
    "getImportances",
)
_TRIAL_LINKS = ("reportTrial", "heartbeatTrial", "tellTrial", "releaseTrial", "getTrial", "listArtifacts")
_SCHEDULE_LINKS = ("getSchedule", "updateSchedule", "runSchedule", "listScheduleRuns", "deleteSchedule")


def _add_cross_site_refusals(schema: dict[str, Any]) -> None:
    """Document the cross-site write check (:mod:`caviar.service.web_security`) on every write:
    403 ``cross_site_request`` and 415 ``unsupported_media_type``, in the error envelope."""
    envelope = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}}
    for item in schema["paths"].values():
        for method, operation in item.items():
            if method.upper() in UNSAFE_METHODS:
                responses = operation.setdefault("responses", {})
                responses.setdefault("403", {"description": "Error", **envelope})
                responses.setdefault("415", {"description": "Unsupported Media Type", **envelope})


def _add_links(schema: dict[str, Any]) -> None:
    """OpenAPI links: what a created study, a claimed trial and a created schedule lead to.

    Clients (and the stateful fuzzer) follow them: ``createStudy`` -> ``askTrial`` -> ``tellTrial``.
    """
    study = {"name": "$response.body#/name"}
    trial = {"name": "$response.body#/study", "number": "$response.body#/number"}
    schedule = {"ref": "$response.body#/name"}
    sources = (
        ("/api/v1/studies", "post", "201", _STUDY_LINKS, study),
        ("/api/v1/studies/{name}/trials/ask", "post", "200", _TRIAL_LINKS, trial),
        ("/api/v1/schedules", "post", "201", _SCHEDULE_LINKS, schedule),
    )
    for path, method, status, targets, parameters in sources:
        response = schema["paths"][path][method]["responses"][status]
        response["links"] = {target: {"operationId": target, "parameters": parameters} for target in targets}


API_PREFIX = "/api/v1"
# The features' routers under API_PREFIX, in routing order (the first match answers).
API_ROUTERS = (
    studies_router,
    trials_router,
    workers_router,
    schedules_router,
    tokens_router,
    whoami_router,
    optuna_router,
)


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
        # the samplers' heavy imports load while the server waits for its first request
        threading.Thread(target=preload_samplers, name="caviar-preload", daemon=True).start()
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
        generate_unique_id_function=operation_id,
    )
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.db = db or Database(
        settings.database_url, pool_size=settings.db_pool_size, lease_pool_size=settings.lease_pool_size
    )
    app.state.ask_gate = AskGate(settings.ask_limit, settings.max_queued_asks)
    install_error_handlers(app)
    app.add_middleware(
        DashboardMount, db=app.state.db, artifact_dir=settings.artifact_dir
    )  # innermost: /dashboard, /static, /api/<not v1>
    install_security(app, settings, app.state.db)  # body cap, then auth (with a token), then CORS

    @app.get("/healthz", tags=["health"], responses=error_responses(503))
    def healthz(request: Request) -> Any:
        try:
            request.app.state.db.ping()
        except Exception as exc:
            _log.warning("health check failed: %s", type(exc).__name__)
            return error_response(503, "database_unreachable", "the database cannot be reached")
        return {"status": "ok"}

    app.include_router(metrics_router)
    # Each feature's router straight under the prefix: given a prefix, FastAPI builds a router's
    # routes (a pydantic adapter per field) when a request first reaches it; one aggregate router
    # included without a prefix had them all built at once, twice per app (0.3 s of create_app).
    api_errors = error_responses(401, 403, 404, 409, 413, 422, 503)
    for router in API_ROUTERS:
        app.include_router(router, prefix=API_PREFIX, responses=api_errors)
    included = [("", metrics_router), *((API_PREFIX, router) for router in API_ROUTERS)]
    # outermost: times, counts and logs every answer (added last: after the routes it labels)
    app.add_middleware(RequestMiddleware, templates=route_templates(app.routes, included))
    return app
