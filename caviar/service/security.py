"""Secure defaults around the whole service: security headers, CORS (off by default), no cross-site
writes, auth, body size cap.

The layers, outermost first: security headers (on every answer, refusals included), CORS (only
when ``cors_origins`` is set, so that preflights are answered before auth), authentication (only
when an admin token is configured: unauthenticated clients get their 401 before any body is read),
the cross-site write check (:mod:`caviar.service.web_security`), then the request body cap.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from caviar.service.auth import AuthMiddleware, TokenVerifier
from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.envelope import error_response
from caviar.service.web_security import CrossSiteWriteMiddleware, SecurityHeadersMiddleware

ARTIFACT_ROUTE = re.compile(r"^/api/v1/studies/[^/]+/trials/[^/]+/artifacts/?$")
"""File uploads: capped by ``max_artifact_bytes`` instead of ``max_body_bytes``."""

OPEN_PATHS = frozenset({"/healthz"})
"""Paths that never need a token (``/metrics`` joins them when ``metrics_auth`` is false)."""


class BodyTooLarge(HTTPException):
    """A request body over the configured cap (answered 413 in the envelope)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes")


class BodyLimitMiddleware:
    """Answer 413 for bodies over ``max_bytes``: by ``Content-Length`` up front, and by counting
    the bytes actually received (chunked uploads carry no length).

    Args:
        app: the next ASGI application.
        max_bytes: the largest body accepted.
        artifact_bytes: the largest file uploaded to ``POST .../trials/{n}/artifacts``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, artifact_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.artifact_bytes = artifact_bytes or max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        if scope["method"] == "POST" and ARTIFACT_ROUTE.match(get_route_path(scope)):
            limit = self.artifact_bytes
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > limit:
                    await self._too_large(scope, receive, send, declared >= 0, limit)
                    return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge:
            if started:
                raise
            await self._too_large(scope, receive, send, True, limit)

    async def _too_large(
        self, scope: Scope, receive: Receive, send: Send, too_long: bool, limit: int
    ) -> None:
        if too_long:
            response = error_response(
                413,
                "payload_too_large",
                f"request body exceeds {limit} bytes",
                headers={"Connection": "close"},
            )
        else:
            response = error_response(400, "bad_request", "invalid Content-Length header")
        await response(scope, receive, send)


def open_paths(settings: Settings) -> frozenset[str]:
    """The paths anyone may request under these settings."""
    return OPEN_PATHS if settings.metrics_auth else OPEN_PATHS | {"/metrics"}


def layers(settings: Settings, db: Database) -> list[tuple[type[Any], dict[str, Any]]]:
    """The security middleware for these settings, innermost first, as ``(class, kwargs)``."""
    stack: list[tuple[type[Any], dict[str, Any]]] = [
        (
            BodyLimitMiddleware,
            {"max_bytes": settings.max_body_bytes, "artifact_bytes": settings.max_artifact_bytes},
        )
    ]
    stack.append((CrossSiteWriteMiddleware, {"trusted_origins": settings.cors_origins}))
    if settings.api_token is not None:
        verifier = TokenVerifier(settings.api_token, db, worker_token=settings.worker_token)
        stack.append((AuthMiddleware, {"verifier": verifier, "open_paths": open_paths(settings)}))
    if settings.cors_origins:
        stack.append(
            (
                CORSMiddleware,
                {
                    "allow_origins": settings.cors_origins,
                    "allow_methods": ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                    "allow_headers": ["Authorization", "Content-Type"],
                    "allow_credentials": False,
                    "max_age": 600,
                },
            )
        )
    stack.append((SecurityHeadersMiddleware, {}))
    return stack


def install_security(app: FastAPI, settings: Settings, db: Database) -> None:
    """Add the security middleware to the API; the token verifier lands on ``app.state``."""
    app.state.token_verifier = None
    for cls, kwargs in layers(settings, db):
        app.add_middleware(cls, **kwargs)  # type: ignore[arg-type]
        if "verifier" in kwargs:
            app.state.token_verifier = kwargs["verifier"]


def secure(app: ASGIApp, settings: Settings, db: Database) -> ASGIApp:
    """Wrap a plain ASGI application (the standalone dashboard) in the same layers as the API."""
    for cls, kwargs in layers(settings, db):
        app = cls(app, **kwargs)
    return app
