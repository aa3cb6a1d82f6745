"""FastAPI dependencies (Annotated aliases used by every router).

Every dependency is ``async def``: FastAPI runs a plain ``def`` dependency on the request thread
pool, and a lease renewal must not wait there behind reports and asks (see
:func:`renewal_limiter`). These only read the app's state and the request; the one that may read
the database (:func:`may_act_on_trial`, for a ``worker``-scope caller) does that part on a thread.
"""

from __future__ import annotations

from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import Depends, Path, Query, Request

from caviar.service.config import Settings
from caviar.service.db import Database
from caviar.service.definition import NAME_PATTERN
from caviar.service.store import LeasePolicy
from caviar.service.tokens import trial as trial_tokens
from caviar.service.tokens import worker as worker_tokens
from caviar.service.types import INT32_MAX, MAX_OFFSET


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_db(request: Request) -> Database:
    return _db(request)


async def get_settings_dep(request: Request) -> Settings:
    return _settings(request)


async def get_lease_policy(request: Request) -> LeasePolicy:
    """The service's lease policy: built from its settings, the one place it is built."""
    return LeasePolicy.from_settings(_settings(request))


def renewal_limiter(request: Request) -> anyio.CapacityLimiter:
    """The threads lease renewals (heartbeats) run on: their own, as they have their own database
    connections (``lease_pool_size``), so a renewal never queues behind the reports, tells and asks
    that fill the request thread pool under load. Made at the first renewal (on the event loop)."""
    limiter: anyio.CapacityLimiter | None = getattr(request.app.state, "renewal_limiter", None)
    if limiter is None:
        limiter = anyio.CapacityLimiter(2 * _settings(request).lease_pool_size)
        request.app.state.renewal_limiter = limiter
    return limiter


LEASE_HEADER = "X-Caviar-Lease"
"""The header a ``worker``-scope caller proves it holds a trial with: the ``credential`` its ask
answered (see :mod:`caviar.service.tokens.trial`)."""


async def may_act_on_trial(request: Request) -> bool:
    """Whether the caller may act on the trial its path names (``{name}``, ``{number}``).

    Write and admin scope act on any trial, and so does everyone on a service without tokens
    (loopback only, nothing to bind to). A trial credential sent as the Bearer token was already
    checked by the auth middleware against this very trial. A ``worker``-scope caller must prove
    it claimed the trial: :data:`LEASE_HEADER` carries the credential its ask answered. The
    ``worker_id`` in a body is a label, never proof.
    """
    scope = getattr(request.state, "token_scope", None)
    if scope is None or scope in ("write", "admin", "trial"):
        return True
    proof = request.headers.get(LEASE_HEADER)
    settings = _settings(request)
    if not proof or settings.api_token is None:
        return False
    try:
        number = int(request.path_params["number"])
    except (KeyError, ValueError):
        return False
    key = trial_tokens.derive_key(settings.api_token.get_secret_value())
    name = request.path_params.get("name", "")
    return await anyio.to_thread.run_sync(trial_tokens.names_trial, _db(request), key, proof, name, number)


async def lease_proof_key(request: Request) -> bytes | None:
    """The key of trial credentials when the caller must prove its claims (``worker`` scope, or a
    trial credential), else None (write scope, no tokens: the ``worker_id`` label decides)."""
    settings = _settings(request)
    scope = getattr(request.state, "token_scope", None)
    if scope is None or scope in ("write", "admin") or settings.api_token is None:
        return None
    return trial_tokens.derive_key(settings.api_token.get_secret_value())


async def worker_key(request: Request) -> bytes | None:
    """The key of worker credentials (:mod:`caviar.service.tokens.worker`); None without tokens."""
    settings = _settings(request)
    if settings.api_token is None:
        return None
    return worker_tokens.derive_key(settings.api_token.get_secret_value())


async def worker_proof_key(request: Request) -> bytes | None:
    """The key of worker credentials when the caller must prove it registered the worker id it
    names (``worker`` scope), else None (write and admin scope act on any worker; without tokens
    there is nothing to bind to)."""
    scope = getattr(request.state, "token_scope", None)
    if scope is None or scope in ("write", "admin"):
        return None
    return await worker_key(request)


async def may_see_env_values(request: Request) -> bool:
    """Whether the caller sees ``objective.env`` values (a read-scope caller sees only the names)."""
    return getattr(request.state, "token_scope", None) != "read"


DbDep = Annotated[Database, Depends(get_db)]
EnvValuesDep = Annotated[bool, Depends(may_see_env_values)]
AnyTrialDep = Annotated[bool, Depends(may_act_on_trial)]
LeaseProofKeyDep = Annotated[bytes | None, Depends(lease_proof_key)]
WorkerKeyDep = Annotated[bytes | None, Depends(worker_key)]
WorkerProofKeyDep = Annotated[bytes | None, Depends(worker_proof_key)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
LeasePolicyDep = Annotated[LeasePolicy, Depends(get_lease_policy)]

StudyName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=128, description="The study's name.")]
TrialNumber = Annotated[int, Path(ge=0, le=INT32_MAX, description="The trial's number in its study.")]
ScheduleRef = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="Id or name.")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip.")]
