"""HTTP adapter for studies: parse, call the domain, shape the answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Response, status
from pydantic import StringConstraints

from caviar.service import store
from caviar.service.definition import StudyDefinition, redact_env
from caviar.service.deps import DbDep, EnvValuesDep, Offset, SettingsDep, StudyName
from caviar.service.studies import refine, service, steering
from caviar.service.studies.schemas import (
    RefineRequest,
    StopRequest,
    StudyList,
    StudyRead,
    StudyState,
    StudyUpdate,
)

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
    record = store.create_study(db, body, data_files=settings.data_dir is not None)
    return service.describe_new(db, record)


@router.get("", summary="List studies")
def list_studies(
    db: DbDep,
    env_values: EnvValuesDep,
    state: Annotated[list[StudyState] | None, Query(description="Only studies in these states.")] = None,
    tag: Annotated[
        list[Annotated[str, StringConstraints(max_length=200)]],
        Query(max_length=16, description="key or key=value; repeated, a study must carry every one."),
    ] = [],  # noqa: B006 (FastAPI copies defaults; no `null` keeps the schema a plain array)
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
    order: Annotated[str, Query(pattern="^(created|queue)$")] = "created",
) -> StudyList:
    found = service.list_studies(
        db, states=state, tags=tag, limit=limit, offset=offset, queue_order=order == "queue"
    )
    if not env_values:
        for item in found.items:
            item.definition = redact_env(item.definition)
    return found


@router.get("/{name}", summary="One study")
def get_study(db: DbDep, name: StudyName, env_values: EnvValuesDep) -> StudyRead:
    study = service.describe(db, store.load_record(db, name))
    if not env_values:  # read scope sees the names of objective.env, not the values
        study.definition = redact_env(study.definition)
    return study


@router.patch("/{name}", summary="Edit a study's budget, priority or tags (JSON merge patch)")
def update_study(db: DbDep, name: StudyName, body: StudyUpdate) -> StudyRead:
    """``budget.n_trials`` goes up or down but never below the trials already used (409
    budget_below_used); raising it reopens a completed study, raising ``budget.max_failed_trials``
    resumes a failed one. ``null`` removes an optional limit; a tag set to ``null`` is removed."""
    return service.describe(db, steering.update_study(db, name, body))


@router.delete(
    "/{name}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a study, its trials and their files"
)
def delete_study(db: DbDep, settings: SettingsDep, name: StudyName) -> Response:
    service.delete_study(db, name, artifacts=store.artifact_store(settings.artifact_dir))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{name}/pause", summary="Stop handing out trials")
def pause_study(db: DbDep, name: StudyName) -> StudyRead:
    return service.describe(db, service.pause_study(db, name))


@router.post("/{name}/resume", summary="Hand out trials again")
def resume_study(db: DbDep, name: StudyName) -> StudyRead:
    return service.describe(db, steering.resume_study(db, name))


@router.post("/{name}/stop", summary="End a study: no new trials, running ones stop, waiting ones cancelled")
def stop_study(db: DbDep, name: StudyName, body: Annotated[StopRequest | None, Body()] = None) -> StudyRead:
    """The study is ``stopping`` while trials still run (their next report answers
    ``should_prune: true``, their heartbeat 409 ``study_stopped``), then ``stopped``."""
    reason = body.reason if body is not None else None
    return service.describe(db, steering.stop_study(db, name, reason=reason))


@router.post(
    "/{name}/refine", status_code=status.HTTP_201_CREATED, summary="Coarse to fine: a narrowed new study"
)
def refine_study(
    db: DbDep, settings: SettingsDep, name: StudyName, body: Annotated[RefineRequest | None, Body()] = None
) -> StudyRead:
    body = body or RefineRequest()
    record = refine.refine(
        db,
        name,
        top_fraction=body.top_fraction,
        min_top=body.min_top,
        margin=body.margin,
        n_trials=body.n_trials,
        data_files=settings.data_dir is not None,
    )
    return service.describe_new(db, record)
