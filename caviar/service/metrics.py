"""Prometheus metrics: HTTP latency and errors per route, and state gauges read from the database.

``GET /metrics`` serves the Prometheus text format. Two kinds of series:

- Request metrics, recorded by :class:`RequestMiddleware` in each server process (which also
  writes the access log, :mod:`caviar.service.access_log`):
  ``caviar_http_request_duration_seconds{method,route}`` (histogram; ``route`` is the route
  template such as ``/api/v1/studies/{name}/trials/ask``, ``dashboard`` for the dashboard,
  ``unmatched`` otherwise) and ``caviar_http_errors_total{route,status}`` (responses >= 400).
- State gauges, computed at scrape time by :class:`DatabaseCollector` with a few ``GROUP BY``
  queries: studies and trials by state, live workers, trial leases by status (``reaped``
  included) and schedule runs by outcome.

With ``caviar serve --processes N`` (N > 1) request metrics use prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set up by :func:`prepare_multiprocess`), so any
process answers a scrape with the sum over all of them; the state gauges come from the database
and are the same whichever process answers.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette._utils import get_route_path
from starlette.routing import BaseRoute, Route, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from caviar.service.access_log import log_request
from caviar.service.dashboard import is_dashboard_path
from caviar.service.db import Database
from caviar.service.deps import DbDep, LeasePolicyDep
from caviar.service.store import STATE_NAMES, trials_by_state
from caviar.storage import ScheduleRun, StudyRecord, TrialLease, WorkerRecord, utcnow

_log = logging.getLogger("caviar.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STUDY_STATES = ("queued", "running", "paused", "completed", "failed", "stopping", "stopped")
TRIAL_STATES = tuple(STATE_NAMES.values())
LEASE_STATUSES = ("active", "finished", "reaped", "released")

disable_created_metrics()  # no ``*_created`` series: they double the page and nobody graphs them

HTTP_REGISTRY = CollectorRegistry(auto_describe=True)
REQUEST_SECONDS = Histogram(
    "caviar_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template and method.",
    ["method", "route"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=HTTP_REGISTRY,
)
HTTP_ERRORS = Counter(
    "caviar_http_errors_total",
    "HTTP responses with a status >= 400, by route template and status code.",
    ["route", "status"],
    registry=HTTP_REGISTRY,
)


def prepare_multiprocess(processes: int) -> None:
    """Before starting N > 1 server processes: give them a shared multiprocess metrics folder.

    Does nothing for one process or when ``PROMETHEUS_MULTIPROC_DIR`` is already set (then the
    caller owns that folder and must empty it before each start). The folder made here is
    removed when this (parent) process exits.
    """
    if processes <= 1 or os.environ.get(MULTIPROC_ENV):
        return
    folder = tempfile.mkdtemp(prefix="caviar-metrics-")
    os.environ[MULTIPROC_ENV] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


class RouteTemplates:
    """Maps a request path onto its route template (a bounded label value, never the raw path).

    Args:
        templates: the path formats of the application's HTTP routes in routing order (the first
            match answers), the docs pages included (see :func:`route_templates`); the
            dashboard's paths are labelled ``dashboard``, anything else ``unmatched``.
    """

    def __init__(self, templates: Sequence[str]) -> None:
        self._patterns = [(compile_path(path)[0], path) for path in dict.fromkeys(templates)]

    def match(self, scope: Scope) -> tuple[str, dict[str, str]]:
        """The route template of this request and the values of its path parameters."""
        path = get_route_path(scope)
        if is_dashboard_path(path):
            return "dashboard", {}
        for pattern, template in self._patterns:
            found = pattern.match(path)
            if found:
                return template, found.groupdict()
        return "unmatched", {}


def route_templates(routes: Sequence[BaseRoute], included: Sequence[tuple[str, APIRouter]]) -> list[str]:
    """The path formats of an app's HTTP routes in routing order: its own routes (``routes``), then
    each router of ``included`` under its prefix, as the app includes them.

    Read from the routers themselves: FastAPI builds an included router's routes (a pydantic adapter
    per field) only when a request first reaches it, and walking the app's flattened routes would
    build them all at the first request of every app.
    """
    own = [route.path_format for route in routes if isinstance(route, Route)]
    return own + [
        prefix + route.path_format
        for prefix, router in included
        for route in router.routes
        if isinstance(route, Route)
    ]


class RequestMiddleware:
    """Time every HTTP request, count error responses, log it (outermost middleware).

    Args:
        app: the next ASGI application.
        templates: the app's route templates (:func:`route_templates`), the labels of its requests.
    """

    def __init__(self, app: ASGIApp, templates: Sequence[str]) -> None:
        self.app = app
        self.routes = RouteTemplates(templates)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            seconds = time.perf_counter() - start
            route, params = self.routes.match(scope)
            REQUEST_SECONDS.labels(scope["method"], route).observe(seconds)
            if status >= 400:
                HTTP_ERRORS.labels(route, str(status)).inc()
            log_request(scope, route, params, status, seconds)


def _gauge(name: str, documentation: str, label: str | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=[label] if label else None)


class DatabaseCollector(Collector):
    """State gauges computed from the database at scrape time (one short session).

    Args:
        db: caviar's database.
        lease_s: a worker is live when seen within this many seconds (2 x heartbeat interval).
    """

    def __init__(self, db: Database, lease_s: float) -> None:
        self.db = db
        self.lease_s = lease_s

    def collect(self) -> Iterator[Metric]:
        up = _gauge("caviar_database_up", "1 when the last scrape could read the database.")
        try:
            families = list(self._families())
        except SQLAlchemyError as exc:
            _log.warning("metrics: database unreachable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterable[Metric]:
        seen_since = utcnow() - timedelta(seconds=self.lease_s)
        with self.db.session() as session:
            studies = dict(
                session.execute(select(StudyRecord.state, func.count()).group_by(StudyRecord.state)).all()
            )
            trials = trials_by_state(session)
            workers = session.scalar(
                select(func.count()).select_from(WorkerRecord).where(WorkerRecord.last_seen_at >= seen_since)
            )
            leases = dict(
                session.execute(select(TrialLease.status, func.count()).group_by(TrialLease.status)).all()
            )
            runs = dict(
                session.execute(select(ScheduleRun.outcome, func.count()).group_by(ScheduleRun.outcome)).all()
            )
        yield _by_label("caviar_studies", "Studies by state.", "state", STUDY_STATES, studies)
        yield _by_label(
            "caviar_trials", "Optuna trials of all studies by state.", "state", TRIAL_STATES, trials
        )
        live = _gauge("caviar_workers_live", "Worker slots seen within 2 x the heartbeat interval.")
        live.add_metric([], int(workers or 0))
        yield live
        yield _by_label(
            "caviar_trial_leases",
            "Trial leases by status (reaped: the lease lapsed and the trial was failed and re-queued).",
            "status",
            LEASE_STATUSES,
            leases,
        )
        yield _by_label("caviar_schedule_runs", "Schedule fires by outcome.", "outcome", (), runs)


def _by_label(
    name: str, documentation: str, label: str, known: Iterable[str], counts: dict[str, int]
) -> GaugeMetricFamily:
    family = _gauge(name, documentation, label)
    for value in sorted(set(known) | set(counts)):
        family.add_metric([value], int(counts.get(value, 0)))
    return family


class _Forward(Collector):
    """Hands on another registry's samples (the process-local request metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()


def render(db: Database, lease_s: float) -> bytes:
    """The metrics page: request metrics (all processes in multiprocess mode) and state gauges."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(db, lease_s))
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:
        registry.register(_Forward(HTTP_REGISTRY))
    return generate_latest(registry)


router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format)",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def metrics(db: DbDep, policy: LeasePolicyDep) -> Response:
    return Response(render(db, policy.lease_s), media_type=CONTENT_TYPE)
