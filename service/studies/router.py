"""HTTP adapter for studies: parse, call the domain, shape the answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Response, status

from caviar.service.definition import StudyDefinition
from caviar.service.deps import DbDep, Offset, SettingsDep, StudyName
from caviar.service.studies import service
from caviar.service.studies.schemas import StudyList, StudyRead, StudyState

router = APIRouter(prefix="/studies", tags=["studies"])

_EXAMPLE = {
    "name": "digits-mlp",
    "direction": "maximize",
    "metric": "val_accuracy",
    "search_space": {
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "scale": "log"},
        "beta1": {"type": "float", "low": 0.8, "high": 0.999, "scale": "reverse_log"},
        "dropout": {"type": "float", "low": 0.0, "high": 0.6},
    },
    "objective": {"kind": "external"},
    "budget": {"n_trials": 20},
}


@router.post("", status_code=status.HTTP_201_CREATED, summary="Create a study from a definition")
def create_study(
    db: DbDep, settings: SettingsDep, body: Annotated[StudyDefinition, Body(examples=[_EXAMPLE])]
) -> StudyRead:
    record = service.create_study(db, body, data_files=settings.data_dir is not None)
    return service.describe(db, record, trials=[])


@router.get("", summary="List studies")
def list_studies(
    db: DbDep,
    state: Annotated[list[StudyState] | None, Query(description="Only studies in these states.")] = None,
    tag: Annotated[str | None, Query(max_length=200, description="key or key=value")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
    order: Annotated[str, Query(pattern="^(created|queue)$")] = "created",
) -> StudyList:
    return service.list_studies(
        db, states=state, tag=tag, limit=limit, offset=offset, queue_order=order == "queue"
    )


@router.get("/{name}", summary="One study")
def get_study(db: DbDep, name: StudyName) -> StudyRead:
    return service.describe(db, service.load_record(db, name))


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a study and its trials")
def delete_study(db: DbDep, name: StudyName) -> Response:
    service.delete_study(db, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{name}/pause", summary="Stop handing out trials")
def pause_study(db: DbDep, name: StudyName) -> StudyRead:
    return service.describe(db, service.pause_study(db, name))


@router.post("/{name}/resume", summary="Hand out trials again")
def resume_study(db: DbDep, name: StudyName) -> StudyRead:
    return service.describe(db, service.resume_study(db, name))
