"""HTTP adapter for workers: registry, the one heartbeat for all leases, and the study queue."""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Path, Query, Request, status

from caviar.service.db import Database
from caviar.service.definition import NAME_PATTERN, ObjectiveKind, redact_env
from caviar.service.deps import (
    DbDep,
    EnvValuesDep,
    LeasePolicyDep,
    LeaseProofKeyDep,
    WorkerKeyDep,
    WorkerProofKeyDep,
    renewal_limiter,
)
from caviar.service.store import LeasePolicy, LeaseRow
from caviar.service.tokens import trial as trial_tokens
from caviar.service.tokens import worker as worker_tokens
from caviar.service.workers import identity, service
from caviar.service.workers.schemas import (
    WORKER_ID_PATTERN,
    HeartbeatResult,
    QueueList,
    TrialRef,
    WorkerHeartbeat,
    WorkerList,
    WorkerRegister,
    WorkerRegistered,
)

router = APIRouter(tags=["workers"])

WorkerIdPath = Annotated[str, Path(pattern=WORKER_ID_PATTERN)]
_NAME = NAME_PATTERN.strip("^$")
STUDY_LIST = f"^{_NAME}(,{_NAME}){{0,99}}$"


@router.get("/workers", summary="Registered workers: device, current trials, last heartbeat, live or lost")
def list_workers(db: DbDep, policy: LeasePolicyDep, live_only: bool = False) -> WorkerList:
    return service.list_workers(db, policy=policy, include_stopped=not live_only)


@router.post("/workers", status_code=status.HTTP_201_CREATED, summary="Register a worker slot")
def register_worker(
    db: DbDep,
    policy: LeasePolicyDep,
    proof_key: WorkerProofKeyDep,
    key: WorkerKeyDep,
    body: WorkerRegister,
) -> WorkerRegistered:
    """A worker token cannot take over a live worker's id (409 ``worker_id_taken``). With tokens
    on, the answer's ``credential`` proves this registration holds the id (send it with every
    heartbeat)."""
    taken = policy if proof_key is not None else None
    worker = service.register_worker(
        db, body.id, host=body.host, pid=body.pid, device=body.device, live_taken=taken
    )
    credential = worker_tokens.mint(key, worker.id, worker.started_at) if key is not None else None
    return WorkerRegistered(
        **worker.model_dump(), heartbeat_interval_s=policy.heartbeat_interval_s, credential=credential
    )


@router.post(
    "/workers/{worker_id}/heartbeat", summary="Renew the leases of all the worker's trials in one call"
)
async def heartbeat_worker(
    request: Request,
    db: DbDep,
    policy: LeasePolicyDep,
    proof_key: LeaseProofKeyDep,
    worker_key: WorkerProofKeyDep,
    worker_id: WorkerIdPath,
    body: WorkerHeartbeat,
) -> HeartbeatResult:
    """With a worker token the body carries the ``credential`` the worker's registration answered
    (else 409 ``not_your_worker``, nothing renewed), and each trial its own ``credential``; one it
    does not prove is answered ``not_your_trial`` and its lease is left alone. Runs on the renewal
    threads (:func:`~caviar.service.deps.renewal_limiter`), never behind reports and asks."""
    return await anyio.to_thread.run_sync(
        lambda: _beat(db, policy, proof_key, worker_key, worker_id, body), limiter=renewal_limiter(request)
    )


def _beat(
    db: Database,
    policy: LeasePolicy,
    proof_key: bytes | None,
    worker_key: bytes | None,
    worker_id: str,
    body: WorkerHeartbeat,
) -> HeartbeatResult:
    if worker_key is not None:
        identity.check_holder(db, worker_key, worker_id, body.credential)
    proves = None
    if proof_key is not None:
        key = proof_key

        def proves(ref: TrialRef, lease: LeaseRow) -> bool:
            grant = trial_tokens.verify(key, ref.credential) if ref.credential else None
            return grant is not None and (grant.trial_id, grant.study_id, grant.number) == (
                lease.trial_id,
                lease.study_id,
                lease.number,
            )

    lost = service.beat(db, worker_id, body.trials, status=body.status, policy=policy, proves=proves)
    return HeartbeatResult(lost=lost)


@router.get("/queue", summary="Studies that hand out trials, in the order workers take them")
def get_queue(
    db: DbDep,
    env_values: EnvValuesDep,
    kind: Annotated[list[ObjectiveKind] | None, Query(max_length=8, description="Only these kinds.")] = None,
    study: Annotated[
        str | None, Query(pattern=STUDY_LIST, description="Only these studies (comma-separated names).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> QueueList:
    found = service.queue(db, kinds=kind or (), names=study.split(",") if study else (), limit=limit)
    if not env_values:  # read scope sees the names of objective.env, not the values
        for item in found.items:
            item.definition = redact_env(item.definition)
    return found
