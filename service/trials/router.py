"""HTTP adapter for the trial lifecycle and trial reads."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Response, status
from fastapi.responses import StreamingResponse

from service.deps import DbDep, SettingsDep
from service.errors import InvalidInput
from service.schemas import error_responses
from service.studies import service as studies
from service.studies.schemas import StudyRead
from service.trials import service
from service.trials.artifacts import artifact_store, open_checkpoint
from service.trials.schemas import (
    AskRequest,
    HeartbeatRequest,
    Importances,
    ParetoTrials,
    RefineRequest,
    ReportRequest,
    ReportResponse,
    TellRequest,
    TrialAssignment,
    TrialList,
    TrialRead,
    TrialStateName,
)

router = APIRouter(prefix="/studies/{name}", tags=["trials"])


def _policy(settings: SettingsDep) -> service.LeasePolicy:
    return service.LeasePolicy(heartbeat_interval_s=settings.heartbeat_interval_s)


@router.post("/trials/ask", summary="Claim a trial", responses=error_responses(429))
def ask(
    db: DbDep, settings: SettingsDep, name: str, body: Annotated[AskRequest | None, Body()] = None
) -> TrialAssignment:
    body = body or AskRequest()
    return service.ask(
        db, name, worker_id=body.worker_id, request_id=body.request_id, policy=_policy(settings)
    )


@router.post("/trials/{number}/report", summary="Report an intermediate value; answers should_prune")
def report(db: DbDep, settings: SettingsDep, name: str, number: int, body: ReportRequest) -> ReportResponse:
    should_prune = service.report(db, name, number, body.step, body.value, policy=_policy(settings))
    return ReportResponse(should_prune=should_prune)


@router.post(
    "/trials/{number}/heartbeat", status_code=status.HTTP_204_NO_CONTENT, summary="Keep the trial's lease"
)
def heartbeat(
    db: DbDep,
    settings: SettingsDep,
    name: str,
    number: int,
    body: Annotated[HeartbeatRequest | None, Body()] = None,
) -> Response:
    service.heartbeat(db, name, number, policy=_policy(settings))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/trials/{number}/tell", summary="Finish a trial")
def tell(db: DbDep, name: str, number: int, body: TellRequest) -> TrialRead:
    if body.value is not None and body.values is not None:
        raise InvalidInput("value: give value or values, not both")
    values = body.values if body.values is not None else ([body.value] if body.value is not None else None)
    return service.tell(db, name, number, body.state, values=values, reason=body.reason)


@router.get("/trials", summary="List trials ordered by number")
def list_trials(
    db: DbDep,
    name: str,
    state: TrialStateName | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> TrialList:
    return service.list_trials(db, name, state=state, limit=limit, offset=offset)


@router.get("/trials/{number}", summary="One trial with its intermediate values")
def get_trial(db: DbDep, name: str, number: int) -> TrialRead:
    return service.get_trial(db, name, number)


@router.get(
    "/trials/{number}/checkpoint",
    summary="Download a trial's trained weights",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def checkpoint(db: DbDep, settings: SettingsDep, name: str, number: int) -> StreamingResponse:
    found, filename, reader = open_checkpoint(db, artifact_store(settings.artifact_dir), name, number)
    headers = {"Content-Disposition": f'attachment; filename="{name}-trial{found}-{filename}"'}
    return StreamingResponse(reader, media_type="application/octet-stream", headers=headers)


@router.get("/best", summary="Best trial (Pareto front for multi-objective studies)")
def best(db: DbDep, name: str) -> TrialRead | ParetoTrials:
    return service.best(db, name)


@router.get("/importances", summary="Parameter importances (decoded names)")
def importances(db: DbDep, name: str) -> Importances:
    return Importances(importances=service.importances(db, name))


@router.post("/refine", status_code=status.HTTP_201_CREATED, summary="Coarse to fine: a narrowed new study")
def refine(db: DbDep, name: str, body: Annotated[RefineRequest | None, Body()] = None) -> StudyRead:
    body = body or RefineRequest()
    record = service.refine(
        db,
        name,
        top_fraction=body.top_fraction,
        min_top=body.min_top,
        margin=body.margin,
        n_trials=body.n_trials,
    )
    return studies.describe(db, record, trials=[])
