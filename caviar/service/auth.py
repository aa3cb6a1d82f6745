"""Bearer-token authentication and scopes, as one ASGI middleware over the whole service.

Auth applies only when ``Settings.api_token`` (``CAVIAR_API_TOKEN``, the admin token) is set;
without it the service binds to loopback only and is open. With it, every request needs a token
except the open paths (``/healthz``, and ``/metrics`` when ``CAVIAR_METRICS_AUTH`` is false).
The scope a request needs depends only on its method and path (:func:`required_scope`), so a
router that anyone adds is covered without any per-route code:

=========  ==================================================================================
scope      may
=========  ==================================================================================
read       GET/HEAD/OPTIONS anything (API, dashboard, OpenAPI docs) except a trial's
           ``trial.log``; ``objective.env`` values are shown to it as ``<redacted>``
worker     read + ``trial.log`` + ``POST /api/v1/studies/{name}/trials/ask``, ``.../trials/reports``,
           ``.../trials/{n}/report``,
           ``.../suggest``, ``.../heartbeat``, ``.../tell``, ``.../release`` and ``.../artifacts``;
           ``POST /api/v1/workers`` and ``/api/v1/workers/{id}/heartbeat``
write      everything except token management (studies, schedules, trials, dashboard writes)
admin      everything, including ``/api/v1/tokens``
trial      (a ``cvt_`` credential an ask returns, see :mod:`caviar.service.tokens.trial`) only
           POST ``report``/``heartbeat``/``tell``/``artifacts`` of its own trial and GET of it,
           and a batch of reports (``.../trials/reports``) in its study whose every report
           carries its own trial's credential, while that trial runs
=========  ==================================================================================

Tokens come as ``Authorization: Bearer <token>`` or, for browsers, HTTP Basic with the token as
the password. Secrets are never logged nor echoed in error messages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import threading
import time
from dataclasses import dataclass
from typing import Final

import anyio.to_thread
from pydantic import SecretStr
from starlette._utils import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from caviar.service.db import Database
from caviar.service.envelope import error_response
from caviar.service.tokens import service as tokens
from caviar.service.tokens import trial as trial_tokens
from caviar.service.tokens.schemas import Scope as TokenScope

SCOPE_LEVELS: Final[dict[str, int]] = {"read": 0, "worker": 1, "write": 2, "admin": 3}
"""Scopes are ordered: each one may do everything the ones below it may."""

SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_PATH: Final = "/api/v1/tokens"
WORKER_ROUTE: Final = re.compile(
    r"^/api/v1/(?:studies/[^/]+/trials/(?:ask|reports|[^/]+/(?:report|suggest|heartbeat|tell|release|artifacts))"
    r"|workers(?:/[^/]+/heartbeat)?)/?$"
)
"""The POSTs a ``worker`` token may make: the trial lifecycle, artifacts, registration, heartbeats."""

SECRET_READS: Final = re.compile(r"^/api/v1/studies/[^/]+/trials/[^/]+/artifacts/trial\.log/?$")
"""GETs that need more than read scope: a code trial's log (the scope that sees ``objective.env``)."""

MAX_TOKEN_CHARS: Final = 512
CACHE_TTL_S: Final = 5.0
"""How long a verified token is trusted without asking the database (revocation delay for
other processes; this process forgets at once)."""

REALM: Final = 'realm="caviar"'


def required_scope(method: str, path: str, open_paths: frozenset[str]) -> TokenScope | None:
    """The least scope allowed to make this request; None for an open path."""
    if path in open_paths:
        return None
    if path == TOKEN_PATH or path.startswith(TOKEN_PATH + "/"):
        return "admin"
    if method in SAFE_METHODS:
        # a program's log may hold anything its environment held: the scope that sees env values
        return "worker" if SECRET_READS.match(path) else "read"
    if method == "POST" and WORKER_ROUTE.match(path):
        return "worker"
    return "write"


def allows(scope: str, needed: str) -> bool:
    """Whether a token of ``scope`` may make a request that needs ``needed``."""
    return SCOPE_LEVELS.get(scope, -1) >= SCOPE_LEVELS[needed]


def credentials(authorization: str | None) -> str | None:
    """The token in an ``Authorization`` header: Bearer, or the password of HTTP Basic."""
    if not authorization:
        return None
    kind, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if kind.lower() == "bearer":
        return value or None
    if kind.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, _, password = decoded.partition(":")
        return password or user or None
    return None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


@dataclass
class _Cached:
    scope: TokenScope
    token_id: int
    expires: float
    touched: float


class TokenVerifier:
    """Resolves a presented token to its scope: the admin token, the worker token, or a stored
    (hashed) one.

    Args:
        admin_token: ``CAVIAR_API_TOKEN``.
        db: where created tokens live.
        worker_token: ``CAVIAR_WORKER_TOKEN`` (a static worker-scope token, for deployments).
        ttl_s: how long a verified token is cached in this process.
    """

    def __init__(
        self,
        admin_token: SecretStr,
        db: Database,
        *,
        worker_token: SecretStr | None = None,
        ttl_s: float = CACHE_TTL_S,
    ) -> None:
        self._admin = _digest(admin_token.get_secret_value())
        self.trial_key = trial_tokens.derive_key(admin_token.get_secret_value())
        self._worker = _digest(worker_token.get_secret_value()) if worker_token is not None else None
        self._db = db
        self._ttl_s = ttl_s
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    def is_admin(self, token: str) -> bool:
        """Constant-time comparison with the admin token (of digests, so length leaks nothing)."""
        return hmac.compare_digest(_digest(token), self._admin)

    def cached(self, token: str) -> TokenScope | None:
        """The scope of a recently verified stored token, without touching the database."""
        entry = self._cache.get(tokens.hash_token(token))
        if entry is None or entry.expires < time.monotonic():
            return None
        return entry.scope

    def verify(self, token: str) -> TokenScope | None:
        """The scope of ``token``, or None when it is unknown or revoked (may query the database)."""
        if self.is_admin(token):
            return "admin"
        if self._worker is not None and hmac.compare_digest(_digest(token), self._worker):
            return "worker"
        key = tokens.hash_token(token)
        now = time.monotonic()
        entry = self._cache.get(key)
        if entry is not None and entry.expires >= now:
            return entry.scope
        found = tokens.lookup_scope(self._db, token)
        if found is None:
            with self._lock:
                self._cache.pop(key, None)
            return None
        token_id, scope, _ = found
        touched = entry.touched if entry is not None else 0.0
        if now - touched >= tokens.LAST_USED_RESOLUTION.total_seconds():
            tokens.touch_token(self._db, token_id)
            touched = now
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = _Cached(scope, token_id, now + self._ttl_s, touched)
        return scope

    def trial_grant(self, token: str) -> trial_tokens.TrialGrant | None:
        """The trial a trial credential (``cvt_...``) names; None when forged or malformed."""
        return trial_tokens.verify(self.trial_key, token)

    def trial_running(self, grant: trial_tokens.TrialGrant, study: str) -> bool:
        """Whether the credential's trial still runs, in this study (queries the database)."""
        return trial_tokens.is_running(self._db, grant, study)

    def forget(self) -> None:
        """Drop every cached verification (after a revocation)."""
        with self._lock:
            self._cache.clear()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class AuthMiddleware:
    """Refuse requests without a token (401) or with too small a scope (403), in the envelope.

    Args:
        app: the next ASGI application.
        verifier: resolves tokens to scopes.
        open_paths: paths anyone may request.
    """

    def __init__(self, app: ASGIApp, verifier: TokenVerifier, open_paths: frozenset[str]) -> None:
        self.app = app
        self.verifier = verifier
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The path the router matches (without a proxy's root_path), so a prefix cannot dodge the policy.
        method, path = scope["method"], get_route_path(scope)
        needed = required_scope(method, path, self.open_paths)
        if needed is None:
            await self.app(scope, receive, send)
            return
        token = credentials(_header(scope, b"authorization"))
        if token is not None and token.startswith(trial_tokens.PREFIX) and len(token) <= MAX_TOKEN_CHARS:
            await self._trial_credential(scope, receive, send, token, method, path)
            return
        granted: TokenScope | None = None
        if token is not None and len(token) <= MAX_TOKEN_CHARS:
            granted = self.verifier.cached(token)
            if granted is None:
                granted = await anyio.to_thread.run_sync(self.verifier.verify, token)
        if granted is None:
            await self._refuse(scope, receive, send, token is None, path)
            return
        if not allows(granted, needed):
            message = f"a {granted} token cannot {method} {path}: it needs {needed} scope"
            response = error_response(403, "forbidden", message, [{"scope": granted, "required": needed}])
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["token_scope"] = granted
        await self.app(scope, receive, send)

    async def _trial_credential(
        self, scope: Scope, receive: Receive, send: Send, token: str, method: str, path: str
    ) -> None:
        """A trial credential: its own running trial's report/heartbeat/tell/upload, nothing else."""
        grant = self.verifier.trial_grant(token)
        if grant is None:
            await self._refuse(scope, receive, send, False, path)
            return
        match = trial_tokens.TRIAL_ROUTE.match(path)
        action = match["action"] if match is not None else None
        allowed = (method == "POST" and action is not None) or (method in SAFE_METHODS and action is None)
        batch = trial_tokens.BATCH_ROUTE.match(path) if method == "POST" else None
        if batch is None and (match is None or int(match["number"]) != grant.number or not allowed):
            message = "a trial credential can only report, heartbeat, upload and tell its own trial"
            response = error_response(403, "forbidden", message, [{"scope": "trial", "required": "worker"}])
            await response(scope, receive, send)
            return
        study = (batch or match)["study"]  # type: ignore[index]
        if not await anyio.to_thread.run_sync(self.verifier.trial_running, grant, study):
            message = "this trial credential is not valid for this study's trial, or its trial has ended"
            response = error_response(409, "lease_lost", message)
            await response(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["token_scope"] = "trial"
        state["trial_grant"] = grant
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, missing: bool, path: str) -> None:
        api = path == "/api/v1" or path.startswith("/api/v1/")
        challenge = f"Bearer {REALM}" if api else f"Basic {REALM}"
        if missing:
            message = "authentication required: send Authorization: Bearer <token>"
        else:
            message = "invalid or revoked token"
        response = error_response(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)
