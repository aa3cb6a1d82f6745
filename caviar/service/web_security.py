"""What a browser may do with the service: security headers, stored files as downloads, no cross-site writes.

Two ASGI middleware, each a thin layer over a plain, unit-tested policy function:

- :class:`SecurityHeadersMiddleware` puts :func:`security_headers` on every response: ``nosniff``,
  ``X-Frame-Options: DENY``, ``Referrer-Policy: same-origin`` and a Content-Security-Policy
  (:func:`content_security_policy`: none at all for JSON and errors, the dashboard's own policy plus
  ``frame-ancestors 'none'`` for its pages, room for the CDN assets of ``/docs`` and ``/redoc``). It
  drops a wildcard ``Access-Control-Allow-Origin`` (optuna-dashboard sends one on its artifact
  routes): CORS answers only the origins configured in ``CAVIAR_CORS_ORIGINS``.
- :class:`CrossSiteWriteMiddleware` refuses, with :func:`write_refusal`, state-changing requests
  a browser could be tricked into sending: a body that is not JSON or bytes (415), and, from a
  browser (an ``Origin`` header, HTTP Basic credentials or a cookie), an origin other than the
  service's own or a configured one (403).

Stored files (checkpoints, logs, anything a worker uploads) are answered with :func:`file_headers`
on every route: ``application/octet-stream``, ``Content-Disposition: attachment`` and a sandboxing
CSP, so an uploaded ``.html`` or ``.svg`` never runs as a page of the service.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from starlette._utils import get_route_path
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from caviar.service.envelope import error_response

UNSAFE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
"""Methods that change state: only these are checked for cross-site use."""

FILE_CSP: Final = "default-src 'none'; sandbox; frame-ancestors 'none'"
"""A stored file, should a browser ever render it: no scripts, no requests, no framing, no origin."""

API_CSP: Final = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
"""JSON, CSV and error answers load nothing and are never framed."""

DOCS_CSP: Final = (
    "default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "font-src https://fonts.gstatic.com data:; img-src 'self' data: https://fastapi.tiangolo.com "
    "https://cdn.redoc.ly; connect-src 'self'; worker-src blob:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
"""``/docs`` (Swagger UI) and ``/redoc`` load their bundle from jsDelivr and start it inline."""

DOCS_PATHS: Final = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})

PAGE_GUARD: Final = "frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
"""Added to a page's own policy (optuna-dashboard's): no framing, no base or form hijack."""

_ACCEPTED_TYPES: Final = frozenset({"application/json", "application/octet-stream"})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def content_security_policy(path: str, existing: str | None) -> str:
    """The Content-Security-Policy a response to ``path`` carries.

    Args:
        path: the request's path.
        existing: the policy the application set itself (optuna-dashboard's pages have one), if any.
    """
    if existing:
        return existing if "frame-ancestors" in existing else f"{existing.rstrip('; ')}; {PAGE_GUARD}"
    if path in DOCS_PATHS:
        return DOCS_CSP
    return API_CSP


def security_headers(path: str, headers: Headers) -> dict[str, str]:
    """The security headers to set on a response to ``path`` that already has ``headers``."""
    return {
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
        "Content-Security-Policy": content_security_policy(path, headers.get("content-security-policy")),
    }


_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]")


def file_headers(filename: str | None = None) -> dict[str, str]:
    """Headers for a stored file: a download that a browser neither renders nor sniffs.

    Args:
        filename: the name offered for saving (anything outside ``[A-Za-z0-9._-]`` becomes ``_``).
    """
    disposition = "attachment"
    if filename:
        disposition += f'; filename="{_UNSAFE_FILENAME.sub("_", filename)}"'
    return {
        "Content-Type": "application/octet-stream",
        "Content-Disposition": disposition,
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": FILE_CSP,
    }


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: the HTTP status and the envelope's code and message."""

    status: int
    code: str
    message: str


def media_type(content_type: str | None) -> str | None:
    """``application/json`` from ``application/json; charset=utf-8`` (None when there is none)."""
    if content_type is None:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


def accepted_media_type(media: str) -> bool:
    """Whether a write may carry a body of this media type: JSON (``+json`` too) or raw bytes.

    Browsers send ``application/x-www-form-urlencoded``, ``multipart/form-data`` and ``text/plain``
    to any site without asking it first (no CORS preflight): those are exactly what this refuses.
    """
    return media in _ACCEPTED_TYPES or (media.startswith("application/") and media.endswith("+json"))


def origin_of(url: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an origin or URL (ports filled in), None for ``null`` or garbage."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


def browser_credentials(authorization: str | None, cookie: str | None) -> bool:
    """Whether the request carries credentials a browser attaches by itself: HTTP Basic, or a cookie.

    A ``Bearer`` token is never sent by a browser on its own: a page must set it, and it cannot do
    that on another site without that site's CORS consent.
    """
    if cookie:
        return True
    return authorization is not None and authorization.strip().lower().startswith("basic")


def write_refusal(
    method: str,
    *,
    content_type: str | None,
    origin: str | None,
    referer: str | None,
    own_origin: str,
    trusted_origins: Iterable[str] = (),
    browser_credentials: bool = False,
) -> Refusal | None:
    """Whether a request must be refused as a possible cross-site write, and why (None: allowed).

    The rules, for POST, PUT, PATCH and DELETE only:

    1. A body must be JSON (``application/json``, ``application/*+json``) or bytes
       (``application/octet-stream``): any other content type is 415 ``unsupported_media_type``.
       No content type at all is fine (an empty body, or a non-browser client's bytes).
    2. An ``Origin`` header (browsers send one with every cross-origin write) must be the service's
       own origin or a trusted one, else 403 ``cross_site_request``.
    3. Without ``Origin`` but with browser credentials (Basic auth, a cookie), the ``Referer`` must
       be from such an origin, else 403: a browser that hides both could be anywhere.

    A client with a Bearer token and no ``Origin`` (curl, the SDK, workers) passes rules 2 and 3.

    Args:
        method: the HTTP method.
        content_type: the ``Content-Type`` header.
        origin: the ``Origin`` header.
        referer: the ``Referer`` header.
        own_origin: the service's origin as the request reached it (``http://host:port``).
        trusted_origins: other origins whose pages may write (``CAVIAR_CORS_ORIGINS``).
        browser_credentials: the request carries Basic credentials or a cookie.
    """
    if method.upper() not in UNSAFE_METHODS:
        return None
    media = media_type(content_type)
    if media is not None and not accepted_media_type(media):
        return Refusal(
            415,
            "unsupported_media_type",
            f"a {method.upper()} body must be application/json (or application/octet-stream for files), "
            f"not {media}",
        )
    allowed = {found for found in map(origin_of, [own_origin, *trusted_origins]) if found is not None}
    if origin is not None:
        if origin_of(origin) not in allowed:
            return Refusal(
                403,
                "cross_site_request",
                f"cross-site {method.upper()} refused: origin {origin[:200]!r} is not this service "
                "nor one of CAVIAR_CORS_ORIGINS",
            )
        return None
    if browser_credentials and (referer is None or origin_of(referer) not in allowed):
        return Refusal(
            403,
            "cross_site_request",
            f"{method.upper()} with browser credentials (Basic auth or a cookie) needs an Origin or Referer "
            "header from this service; scripts and tools should send Authorization: Bearer <token>",
        )
    return None


def own_origin(scope: Scope) -> str:
    """The origin the request reached the service at: its scheme and ``Host`` header."""
    headers = Headers(scope=scope)
    host = headers.get("host")
    if not host:
        server = scope.get("server")
        host = f"{server[0]}:{server[1]}" if server else "localhost"
    return f"{scope.get('scheme', 'http')}://{host}"


class CrossSiteWriteMiddleware:
    """Refuse writes a browser could be tricked into (:func:`write_refusal`), in the error envelope.

    Args:
        app: the next ASGI application.
        trusted_origins: origins other than the service's own whose pages may write.
    """

    def __init__(self, app: ASGIApp, trusted_origins: Collection[str] = ()) -> None:
        self.app = app
        self.trusted_origins = tuple(trusted_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in UNSAFE_METHODS:
            headers = Headers(scope=scope)
            refusal = write_refusal(
                scope["method"],
                content_type=headers.get("content-type"),
                origin=headers.get("origin"),
                referer=headers.get("referer"),
                own_origin=own_origin(scope),
                trusted_origins=self.trusted_origins,
                browser_credentials=browser_credentials(headers.get("authorization"), headers.get("cookie")),
            )
            if refusal is not None:
                response = error_response(refusal.status, refusal.code, refusal.message)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class SecurityHeadersMiddleware:
    """Add :func:`security_headers` to every HTTP response and drop a wildcard CORS grant.

    Args:
        app: the next ASGI application.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = get_route_path(scope)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in security_headers(path, headers).items():
                    headers[name] = value
                if headers.get("access-control-allow-origin") == "*":
                    del headers["access-control-allow-origin"]
            await send(message)

        await self.app(scope, receive, send_with_headers)
