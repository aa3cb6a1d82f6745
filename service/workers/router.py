"""HTTP adapter for the worker registry."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import DbDep, SettingsDep
from service.workers import service
from service.workers.schemas import WorkerList

router = APIRouter(prefix="/workers", tags=["workers"])


@router.get("", summary="Registered workers: device, current trials, last heartbeat, live or lost")
def list_workers(db: DbDep, settings: SettingsDep, live_only: bool = False) -> WorkerList:
    return service.list_workers(
        db, heartbeat_interval_s=settings.heartbeat_interval_s, include_stopped=not live_only
    )
