"""HTTP adapter for schedules: parse, call the domain, shape the answer.

``{ref}`` is a schedule's id or its name.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Response, status

from caviar.service.definition import redact_env
from caviar.service.deps import DbDep, EnvValuesDep, Offset, ScheduleRef, SettingsDep
from caviar.service.schedules import service
from caviar.service.schedules.schemas import (
    ScheduleCreate,
    ScheduleList,
    ScheduleRead,
    ScheduleRunList,
    ScheduleRunRead,
    ScheduleUpdate,
)

router = APIRouter(prefix="/schedules", tags=["schedules"])

_EXAMPLE = {
    "name": "nightly-digits",
    "cron": "30 2 * * *",
    "timezone": "Europe/Berlin",
    "misfire": "skip",
    "overlap": "skip_if_running",
    "template": {
        "direction": "maximize",
        "metric": "val_accuracy",
        "search_space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "scale": "log"}},
        "objective": {"kind": "external"},
        "budget": {"n_trials": 20},
    },
}


@router.get("", summary="List schedules")
def list_schedules(
    db: DbDep,
    env_values: EnvValuesDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> ScheduleList:
    found = service.list_schedules(db, limit=limit, offset=offset)
    if not env_values:  # read scope sees the names of objective.env, not the values
        for item in found.items:
            item.template = redact_env(item.template)
    return found


@router.post("", status_code=status.HTTP_201_CREATED, summary="Create a schedule")
def create_schedule(
    db: DbDep, settings: SettingsDep, body: Annotated[ScheduleCreate, Body(examples=[_EXAMPLE])]
) -> ScheduleRead:
    return service.create_schedule(db, body, data_files=settings.data_dir is not None)


@router.get("/{ref}", summary="One schedule (by id or name)")
def get_schedule(db: DbDep, ref: ScheduleRef, env_values: EnvValuesDep) -> ScheduleRead:
    found = service.show_schedule(db, ref)
    if not env_values:
        found.template = redact_env(found.template)
    return found


@router.patch("/{ref}", summary="Enable/disable a schedule or change its timing, template or policies")
def update_schedule(db: DbDep, settings: SettingsDep, ref: ScheduleRef, body: ScheduleUpdate) -> ScheduleRead:
    return service.update_schedule(db, ref, body, data_files=settings.data_dir is not None)


@router.delete("/{ref}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a schedule and its runs")
def delete_schedule(db: DbDep, ref: ScheduleRef) -> Response:
    service.delete_schedule(db, ref)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{ref}/run", status_code=status.HTTP_201_CREATED, summary="Create the schedule's study now")
def run_schedule(db: DbDep, ref: ScheduleRef) -> ScheduleRunRead:
    return service.run_now(db, ref)


@router.get("/{ref}/runs", summary="A schedule's runs, newest first, with their studies' state")
def list_schedule_runs(
    db: DbDep,
    ref: ScheduleRef,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> ScheduleRunList:
    return service.list_runs(db, ref, limit=limit, offset=offset)
