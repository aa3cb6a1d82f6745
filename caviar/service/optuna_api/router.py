"""HTTP adapter of Optuna's storage API (``/api/v1/optuna/...``), what ``caviar.optuna_storage``
calls. Reads are GETs (read scope); writes are POSTs and DELETEs (write scope)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from caviar import _optuna_wire as wire
from caviar.service.deps import DbDep, LeasePolicyDep
from caviar.service.envelope import error_responses
from caviar.service.optuna_api import service
from caviar.service.optuna_api.schemas import (
    MAX_INCLUDED_CHARS,
    AttrWrite,
    FrozenStudyWire,
    FrozenTrialWire,
    HeartbeatAnswer,
    HeartbeatBatch,
    IntermediateWrite,
    ParamWrite,
    StateWrite,
    StateWritten,
    StudyCreate,
    StudyCreated,
    StudyIdRead,
    TrialCreate,
    TrialCreated,
    TrialIdRead,
    TrialList,
)
from caviar.service.types import INT32_MAX

router = APIRouter(prefix="/optuna", tags=["optuna storage"], responses=error_responses(404, 409, 422))

StudyId = Annotated[int, Path(ge=0, le=INT32_MAX, description="Optuna's study id.")]
TrialId = Annotated[int, Path(ge=0, le=INT32_MAX, description="Optuna's trial id.")]


def _template(body: TrialCreate) -> FrozenTrial | None:
    """The template trial of a request, or OptunaValueError naming what does not parse."""
    if body.template is None:
        return None
    try:
        return wire.trial_in(body.template.model_dump())
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise service.OptunaValueError(
            f"template: not a trial Optuna can store ({type(exc).__name__})"
        ) from None


def _distribution(text: str | None, field: str) -> BaseDistribution | None:
    if text is None:
        return None
    try:
        return json_to_distribution(text)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise service.OptunaValueError(
            f"{field}: not an Optuna distribution ({type(exc).__name__})"
        ) from None


def _parse_attr(value_json: str) -> object:
    import json  # lazy: only attribute writes decode JSON text

    try:
        return json.loads(value_json)
    except ValueError:
        raise service.OptunaValueError("value_json: not JSON text") from None


@router.post("/studies", status_code=status.HTTP_201_CREATED, summary="create_new_study")
def create_optuna_study(db: DbDep, body: StudyCreate) -> StudyCreated:
    study_id, name = service.create_study(db, [StudyDirection[d] for d in body.directions], body.study_name)
    return StudyCreated(study_id=study_id, study_name=name)


@router.get("/studies", summary="get_all_studies (a page of them, by study id)")
def list_optuna_studies(
    db: DbDep,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Studies per page.")] = 1000,
    offset: Annotated[int, Query(ge=0, le=INT32_MAX, description="Studies to skip.")] = 0,
) -> list[FrozenStudyWire]:
    return [FrozenStudyWire(**wire.study_out(s)) for s in service.all_studies(db, limit=limit, offset=offset)]


@router.get("/study-ids", summary="get_study_id_from_name")
def optuna_study_id(db: DbDep, name: Annotated[str, Query(max_length=1024)]) -> StudyIdRead:
    return StudyIdRead(study_id=service.study_id_from_name(db, name))


@router.get("/studies/{study_id}", summary="get_study_name_from_id, directions and attributes")
def get_optuna_study(db: DbDep, study_id: StudyId) -> FrozenStudyWire:
    return FrozenStudyWire(**wire.study_out(service.get_study(db, study_id)))


@router.delete("/studies/{study_id}", status_code=status.HTTP_204_NO_CONTENT, summary="delete_study")
def delete_optuna_study(db: DbDep, study_id: StudyId) -> Response:
    service.delete_study(db, study_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/studies/{study_id}/attrs", status_code=status.HTTP_204_NO_CONTENT, summary="set_study_*_attr")
def set_optuna_study_attr(db: DbDep, study_id: StudyId, body: AttrWrite) -> Response:
    service.set_study_attr(db, study_id, body.kind, body.key, _parse_attr(body.value_json))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/studies/{study_id}/trials",
    status_code=status.HTTP_201_CREATED,
    summary="create_new_trial (within the study's budget; a running trial is leased)",
    responses=error_responses(429),
)
def create_optuna_trial(
    db: DbDep, policy: LeasePolicyDep, study_id: StudyId, body: TrialCreate
) -> TrialCreated:
    template = _template(body)
    trial, left = service.create_trial(db, study_id, template, client_id=body.client_id, policy=policy)
    return TrialCreated(
        trial=FrozenTrialWire(**wire.trial_out(trial, study_id)),
        budget_left=left,
        heartbeat_interval_s=policy.heartbeat_interval_s,
    )


@router.get("/studies/{study_id}/trials", summary="get_all_trials (incrementally, as Optuna's cache reads)")
def list_optuna_trials(
    db: DbDep,
    study_id: StudyId,
    included: Annotated[str, Query(max_length=MAX_INCLUDED_CHARS, pattern=r"^[0-9,]*$")] = "",
    greater_than: Annotated[int, Query(ge=-1, le=INT32_MAX)] = -1,
    states: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Z,]*$")] = None,
) -> TrialList:
    ids = {int(part) for part in included.split(",") if part}
    wanted = (
        [TrialState[s] for s in states.split(",") if s in TrialState.__members__]
        if states is not None
        else None
    )
    trials = service.get_trials(db, study_id, ids, greater_than, wanted)
    return TrialList(trials=[FrozenTrialWire(**wire.trial_out(t, study_id)) for t in trials])


@router.get("/studies/{study_id}/trial-ids/{number}", summary="get_trial_id_from_study_id_trial_number")
def optuna_trial_id(
    db: DbDep, study_id: StudyId, number: Annotated[int, Path(ge=0, le=INT32_MAX)]
) -> TrialIdRead:
    return TrialIdRead(trial_id=service.trial_id_from_number(db, study_id, number))


@router.get("/studies/{study_id}/best-trial-id", summary="get_best_trial")
def optuna_best_trial_id(db: DbDep, study_id: StudyId) -> TrialIdRead:
    return TrialIdRead(trial_id=service.best_trial_id(db, study_id))


@router.get("/trials/{trial_id}", summary="get_trial")
def get_optuna_trial(db: DbDep, trial_id: TrialId) -> FrozenTrialWire:
    trial = service.get_trial(db, trial_id)
    return FrozenTrialWire(**wire.trial_out(trial, service.study_of_trial(db, trial_id)))


@router.post("/trials/{trial_id}/params", status_code=status.HTTP_204_NO_CONTENT, summary="set_trial_param")
def set_optuna_param(db: DbDep, trial_id: TrialId, body: ParamWrite) -> Response:
    distribution = _distribution(body.distribution, "distribution")
    assert distribution is not None
    previous = _distribution(body.previous_distribution, "previous_distribution")
    service.set_param(db, trial_id, body.name, wire.num_in(body.internal), distribution, previous)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/trials/{trial_id}/state", summary="set_trial_state_values")
def set_optuna_state(db: DbDep, policy: LeasePolicyDep, trial_id: TrialId, body: StateWrite) -> StateWritten:
    study_id, updated, left, following = service.set_state(
        db,
        trial_id,
        TrialState[body.state],
        wire.values_in(body.values),
        client_id=body.client_id,
        policy=policy,
        prefetch=body.prefetch,
    )
    return StateWritten(
        updated=updated,
        study_id=study_id,
        budget_left=left,
        heartbeat_interval_s=policy.heartbeat_interval_s,
        next_trial=FrozenTrialWire(**wire.trial_out(following, study_id)) if following is not None else None,
    )


@router.post(
    "/trials/{trial_id}/release",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Hand back a prefetched trial the client will not run",
)
def release_optuna_trial(db: DbDep, trial_id: TrialId) -> Response:
    service.release_trial(db, trial_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/trials/{trial_id}/intermediate-values",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="set_trial_intermediate_value",
)
def set_optuna_intermediate(db: DbDep, trial_id: TrialId, body: IntermediateWrite) -> Response:
    service.set_intermediate(db, trial_id, body.step, wire.num_in(body.value))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/trials/{trial_id}/attrs", status_code=status.HTTP_204_NO_CONTENT, summary="set_trial_*_attr")
def set_optuna_trial_attr(db: DbDep, trial_id: TrialId, body: AttrWrite) -> Response:
    service.set_trial_attr(db, trial_id, body.kind, body.key, _parse_attr(body.value_json))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/heartbeats", summary="record_heartbeat, for every running trial of one client")
def optuna_heartbeats(db: DbDep, policy: LeasePolicyDep, body: HeartbeatBatch) -> HeartbeatAnswer:
    return HeartbeatAnswer(lost=service.heartbeat(db, body.trial_ids, policy))
