"""HTTP adapter for the trial lifecycle and trial reads."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Annotated, BinaryIO

import anyio.to_thread
from fastapi import APIRouter, Body, Query, Request, Response, status
from fastapi import Path as FastApiPath
from fastapi.responses import StreamingResponse

from caviar.service import trials as service
from caviar.service.deps import (
    AnyTrialDep,
    DbDep,
    LeasePolicyDep,
    LeaseProofKeyDep,
    Offset,
    SettingsDep,
    StudyName,
    TrialNumber,
    renewal_limiter,
)
from caviar.service.envelope import error_responses
from caviar.service.errors import InvalidInput
from caviar.service.store import artifact_store
from caviar.service.tokens import trial as trial_tokens
from caviar.service.trials import admission, artifacts, enqueue, export, suggest
from caviar.service.trials.artifacts import FILENAME_PATTERN, open_checkpoint, save_artifact
from caviar.service.trials.export import ExportFormat
from caviar.service.trials.schemas import (
    ArtifactRead,
    AskRequest,
    EnqueueRequest,
    HeartbeatRequest,
    Importances,
    ParetoTrials,
    ReleaseRequest,
    ReportBatch,
    ReportBatchResult,
    ReportOutcome,
    ReportRequest,
    ReportResponse,
    SuggestRequest,
    SuggestResponse,
    TellRequest,
    TrialAssignment,
    TrialList,
    TrialRead,
    TrialStateName,
)
from caviar.service.web_security import file_headers
from caviar.storage import TrialLease

router = APIRouter(prefix="/studies/{name}", tags=["trials"])


@router.post("/trials/ask", summary="Claim a trial", responses=error_responses(429, 503))
async def ask_trial(
    request: Request,
    db: DbDep,
    policy: LeasePolicyDep,
    settings: SettingsDep,
    name: StudyName,
    body: Annotated[AskRequest | None, Body()] = None,
) -> TrialAssignment:
    """At most ``max_concurrent_asks`` asks run at once in one server process; one more waits in
    line for a turn (``ask_queue_s``, ``max_queued_asks``), past which it is answered 429
    ``too_many_asks`` with a jittered ``Retry-After``. An ask whose sampler outruns
    ``ask_timeout_s`` is answered 503 ``sampler_slow``; its trial is handed back (not failed) and
    the next ask gets it."""
    body = body or AskRequest()

    def work() -> TrialAssignment:
        assignment = service.ask(
            db,
            name,
            worker_id=body.worker_id,
            request_id=body.request_id,
            policy=policy,
            fixed=body.fixed,
        )
        if settings.api_token is not None:  # the program a worker runs gets this, not the worker's token
            key = trial_tokens.derive_key(settings.api_token.get_secret_value())
            assignment.credential = trial_tokens.mint_for(db, key, name, assignment.number)
        return assignment

    def hand_back(assignment: TrialAssignment) -> None:
        reason = f"sampled after the ask's limit ({settings.ask_timeout_s:g}s, ask_timeout_s)"
        service.release(db, name, assignment.number, reason=reason)

    gate: admission.AskGate = request.app.state.ask_gate
    return await admission.admitted(
        gate, work, timeout_s=settings.ask_timeout_s, hand_back=hand_back, queue_s=settings.ask_queue_s
    )


@router.post("/trials/{number}/report", summary="Report an intermediate value; answers should_prune")
def report_trial(
    db: DbDep,
    policy: LeasePolicyDep,
    any_trial: AnyTrialDep,
    name: StudyName,
    number: TrialNumber,
    body: ReportRequest,
) -> ReportResponse:
    caller = service.Caller(body.worker_id, any_trial)
    should_prune = service.report(db, name, number, body.step, body.value, policy=policy, caller=caller)
    return ReportResponse(should_prune=should_prune)


@router.post(
    "/trials/reports", summary="Report intermediate values of several trials; answers should_prune for each"
)
def report_trials(
    db: DbDep, policy: LeasePolicyDep, proof_key: LeaseProofKeyDep, name: StudyName, body: ReportBatch
) -> ReportBatchResult:
    """Each report is recorded as a single report of its trial would be, in the batch's order (a
    fused group sends its members' values of one epoch in one call). A report its trial cannot take
    (``lease_lost``, ``trial_finished``, ``trial_not_running``, ``not_your_trial``,
    ``trial_not_found``) is answered with that code and ``should_prune: true``; the others are still
    recorded. With a worker token, or a trial credential (a fused group's program), each report
    carries its own trial's ``credential``."""

    def proof(credential: str | None) -> Callable[[TrialLease], bool] | None:
        if proof_key is None:
            return None
        grant = trial_tokens.verify(proof_key, credential) if credential else None
        return lambda lease: grant is not None and grant.names(lease)

    reports = [service.Reported(r.number, r.step, r.value, proof(r.credential)) for r in body.reports]
    results = service.report_many(db, name, reports, policy=policy, worker_id=body.worker_id)
    return ReportBatchResult(results=[ReportOutcome(**vars(r)) for r in results])


@router.post("/trials/{number}/suggest", summary="Sample one parameter of a running trial (define-by-run)")
def suggest_param(
    db: DbDep,
    policy: LeasePolicyDep,
    any_trial: AnyTrialDep,
    name: StudyName,
    number: TrialNumber,
    body: SuggestRequest,
) -> SuggestResponse:
    """A declared parameter answers its sampled value once the call matches the declaration (422
    ``suggest_mismatch`` naming both otherwise); an undeclared one is sampled by the study's sampler
    and stored. The same name again answers the same value (409 ``distribution_mismatch`` for another
    distribution)."""
    caller = service.Caller(body.worker_id, any_trial)
    value = suggest.suggest(db, name, number, body.name, body.distribution, policy=policy, caller=caller)
    return SuggestResponse(value=value)


@router.post(
    "/trials/{number}/heartbeat", status_code=status.HTTP_204_NO_CONTENT, summary="Keep the trial's lease"
)
async def heartbeat_trial(
    request: Request,
    db: DbDep,
    policy: LeasePolicyDep,
    any_trial: AnyTrialDep,
    name: StudyName,
    number: TrialNumber,
    body: Annotated[HeartbeatRequest | None, Body()] = None,
) -> Response:
    """Runs on the renewal threads (:func:`~caviar.service.deps.renewal_limiter`)."""
    caller = service.Caller(body.worker_id if body else None, any_trial)
    await anyio.to_thread.run_sync(
        lambda: service.heartbeat(db, name, number, policy=policy, caller=caller),
        limiter=renewal_limiter(request),
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/trials/{number}/tell", summary="Finish a trial")
def tell_trial(
    db: DbDep, any_trial: AnyTrialDep, name: StudyName, number: TrialNumber, body: TellRequest
) -> TrialRead:
    if body.value is not None and body.values is not None:
        raise InvalidInput("value: give value or values, not both")
    if body.fatal and body.state != "fail":
        raise InvalidInput("fatal: only with state fail")
    values = body.values if body.values is not None else ([body.value] if body.value is not None else None)
    caller = service.Caller(body.worker_id, any_trial)
    return service.tell(
        db,
        name,
        number,
        body.state,
        values=values,
        reason=body.reason,
        user_attrs=body.user_attrs,
        caller=caller,
        fatal=body.fatal,
    )


@router.post("/trials/{number}/release", summary="Hand a running trial back (retried without using a retry)")
def release_trial(
    db: DbDep,
    any_trial: AnyTrialDep,
    name: StudyName,
    number: TrialNumber,
    body: Annotated[ReleaseRequest | None, Body()] = None,
) -> TrialRead:
    body = body or ReleaseRequest()
    service.release(db, name, number, reason=body.reason, caller=service.Caller(body.worker_id, any_trial))
    return service.get_trial(db, name, number)


@router.post(
    "/trials/{number}/artifacts",
    status_code=status.HTTP_201_CREATED,
    summary="Store a file with a trial (checkpoint, log); the body is the file",
    openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}, "required": True}},
)
async def upload_artifact(
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    any_trial: AnyTrialDep,
    name: StudyName,
    number: TrialNumber,
    filename: Annotated[str, Query(pattern=FILENAME_PATTERN, description="The file's name.")],
) -> ArtifactRead:
    """Only while the trial runs (409 ``trial_finished`` otherwise, nothing kept), and only by the
    worker that claimed it (its credential, as Bearer or ``X-Caviar-Lease``) or write scope."""
    caller = service.Caller(None, any_trial)
    await anyio.to_thread.run_sync(artifacts.check_upload, db, name, number, caller)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, filename)
        with open(path, "wb") as handle:
            async for chunk in request.stream():
                handle.write(chunk)
        artifact_id = await anyio.to_thread.run_sync(
            save_artifact, db, artifact_store(settings.artifact_dir), name, number, path, caller
        )
    return ArtifactRead(artifact_id=artifact_id, filename=filename)


@router.post(
    "/trials/enqueue",
    status_code=status.HTTP_201_CREATED,
    summary="Enqueue parameter sets (handed out first) or import known results",
)
def enqueue_trials(db: DbDep, settings: SettingsDep, name: StudyName, body: EnqueueRequest) -> TrialList:
    """Parameters in decoded names (``beta1: 0.95``), checked against the search space (422 naming the
    field). With ``value``/``values`` a set is imported as a complete trial the sampler learns from.
    The sets count against ``budget.n_trials`` (409 budget_exhausted when they would overshoot it).
    They are written ``import_chunk_size`` at a time (asks and heartbeats go on between chunks)."""
    items = enqueue.enqueue(db, name, body.trials, chunk_size=settings.import_chunk_size)
    return TrialList(items=items, total=len(items))


@router.get(
    "/trials/export",
    summary="Every trial as CSV or JSON",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}, "application/json": {}}}},
)
def export_trials(db: DbDep, name: StudyName, format: ExportFormat = "csv") -> Response:
    """CSV: one row per trial, ``params.<name>`` columns, one column per metric for a multi-objective
    study. JSON: an array of Trial objects."""
    text = export.export_trials(db, name, format)
    media = "text/csv; charset=utf-8" if format == "csv" else "application/json"
    headers = {"Content-Disposition": f'attachment; filename="{name}-trials.{format}"'}
    return Response(content=text, media_type=media, headers=headers)


@router.get("/trials", summary="List trials ordered by number")
def list_trials(
    db: DbDep,
    name: StudyName,
    state: TrialStateName | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> TrialList:
    return service.list_trials(db, name, state=state, limit=limit, offset=offset)


@router.get("/trials/{number}", summary="One trial with its intermediate values")
def get_trial(db: DbDep, name: StudyName, number: TrialNumber) -> TrialRead:
    return service.get_trial(db, name, number)


@router.get(
    "/trials/{number}/checkpoint",
    summary="Download a trial's trained weights",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_checkpoint(
    db: DbDep, settings: SettingsDep, name: StudyName, number: TrialNumber
) -> StreamingResponse:
    found, filename, reader = open_checkpoint(db, artifact_store(settings.artifact_dir), name, number)
    return _download(reader, f"{name}-trial{found}-{filename}")


@router.get(
    "/checkpoint",
    summary="Download the trained weights of the best complete trial that has a checkpoint",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_best_checkpoint(db: DbDep, settings: SettingsDep, name: StudyName) -> StreamingResponse:
    found, filename, reader = open_checkpoint(db, artifact_store(settings.artifact_dir), name)
    return _download(reader, f"{name}-trial{found}-{filename}")


@router.get("/trials/{number}/artifacts", summary="The files stored with a trial (checkpoints, logs)")
def list_artifacts(db: DbDep, name: StudyName, number: TrialNumber) -> list[ArtifactRead]:
    return artifacts.list_artifacts(db, name, number)


@router.get(
    "/trials/{number}/artifacts/{filename}",
    summary="Download a file stored with a trial (the newest of that name)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_artifact(
    db: DbDep,
    settings: SettingsDep,
    name: StudyName,
    number: TrialNumber,
    filename: Annotated[str, FastApiPath(pattern=FILENAME_PATTERN)],
) -> StreamingResponse:
    reader = artifacts.open_artifact(db, artifact_store(settings.artifact_dir), name, number, filename)
    return _download(reader, f"{name}-trial{number}-{filename}")


def _download(reader: BinaryIO, filename: str) -> StreamingResponse:
    """A stored file as a download that no browser renders (see :func:`file_headers`)."""
    return StreamingResponse(reader, media_type="application/octet-stream", headers=file_headers(filename))


@router.get("/best", summary="Best trial (Pareto front for multi-objective studies)")
def best_trial(db: DbDep, name: StudyName) -> TrialRead | ParetoTrials:
    return service.best(db, name)


@router.get("/importances", summary="Parameter importances (decoded names)")
def get_importances(db: DbDep, name: StudyName) -> Importances:
    return Importances(importances=service.importances(db, name))
