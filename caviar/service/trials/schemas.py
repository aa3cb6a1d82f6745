"""Request and response schemas of the trial lifecycle."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt

from caviar.service.types import INT32_MAX, Credential, Identifier, Text, no_nul

TrialStateName = Literal["waiting", "running", "complete", "pruned", "fail"]


WorkerId = Annotated[Identifier, Field(description="Who runs the trial (1-128 printable characters).")]
Scalar = Annotated[str, Field(max_length=1000), AfterValidator(no_nul)] | int | float | bool | None
AttrKey = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")]


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker_id: WorkerId | None = None
    request_id: Identifier | None = Field(
        default=None, description="Repeat an ask safely: same id, same trial."
    )
    fixed: dict[Annotated[str, Field(max_length=64)], Scalar] | None = Field(
        default=None,
        max_length=256,
        description="Decoded parameter values to keep; the sampler chooses the rest (fused groups).",
    )


class TrialAssignment(BaseModel):
    """What an ask hands out: a trial to run, with decoded parameters and its lease."""

    study: str
    number: int
    params: dict[str, Any]
    heartbeat_interval_s: float
    lease_expires_at: datetime
    retry_of: int | None = None
    credential: str | None = Field(
        default=None,
        description="With tokens on: a token for this trial only (report, heartbeat, upload, tell) "
        "while it runs; a worker hands it to the program it runs instead of its own token.",
    )


class ReportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: StrictInt = Field(ge=0, le=INT32_MAX)
    value: float
    worker_id: WorkerId | None = None


class ReportResponse(BaseModel):
    should_prune: bool


MAX_BATCH_REPORTS = 256
"""The most reports one batch may carry (a fused group sends one per member and epoch)."""


class ReportItem(BaseModel):
    """One intermediate value of one trial, in a batch."""

    model_config = ConfigDict(extra="forbid")

    number: StrictInt = Field(ge=0, le=INT32_MAX, description="The trial's number in the study.")
    step: StrictInt = Field(ge=0, le=INT32_MAX)
    value: float
    credential: Credential | None = Field(
        default=None,
        description="The credential the trial's ask answered: a worker-scope token or a trial "
        "credential must send it (with tokens on), as the X-Caviar-Lease header of a single report.",
    )


class ReportBatch(BaseModel):
    """Intermediate values of several trials of one study (a fused group's epoch), in one call."""

    model_config = ConfigDict(extra="forbid")

    reports: list[ReportItem] = Field(
        min_length=1,
        max_length=MAX_BATCH_REPORTS,
        description="Recorded in this order, each as its own report would be (the pruner of a later "
        "one sees the earlier ones).",
    )
    worker_id: WorkerId | None = None


class ReportOutcome(BaseModel):
    """What became of one report of a batch."""

    number: int
    step: int
    should_prune: bool = Field(description="True also when the report was refused (``code``): stop it.")
    code: str | None = Field(
        default=None,
        description="Why this report was not recorded (its trial's error, as a single report would "
        "answer it): lease_lost, trial_finished, trial_not_running, not_your_trial or trial_not_found.",
    )
    message: str | None = None


class ReportBatchResult(BaseModel):
    results: list[ReportOutcome] = Field(description="One per report, in the batch's order.")


class SuggestRequest(BaseModel):
    """Ask for one parameter of a running trial (define-by-run)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="The parameter's name.")
    distribution: dict[str, Any] = Field(
        description="Optuna's distribution JSON, as optuna.distributions.distribution_to_json writes it: "
        '{"name": "FloatDistribution", "attributes": {"low": 0.0, "high": 1.0, "log": false, "step": null}}.'
    )
    worker_id: WorkerId | None = None


class SuggestResponse(BaseModel):
    """The parameter's value: sampled by the study's sampler, or the one stored before."""

    value: Any


class HeartbeatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker_id: WorkerId | None = None


class ReleaseRequest(BaseModel):
    """Hand a running trial back unfinished: it is retried without using up a retry."""

    model_config = ConfigDict(extra="forbid")

    reason: Text = "handed back by worker"
    worker_id: WorkerId | None = None


def _check_attrs(attrs: dict[str, Any] | None) -> dict[str, Any] | None:
    for key, value in (attrs or {}).items():
        if key.startswith("caviar"):
            raise ValueError(f"{key!r}: attribute names starting with 'caviar' are reserved")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key!r}: must be a finite number")
        if isinstance(value, str) and (len(value) > 1000 or "\x00" in value):
            raise ValueError(f"{key!r}: at most 1000 characters, no NUL")
        if not isinstance(value, str | int | float | bool | None):
            raise ValueError(f"{key!r}: must be a string, a number, true/false or null")
    return attrs


UserAttrs = Annotated[
    dict[AttrKey, Any] | None,
    Field(max_length=64, description="Recorded on the trial (epochs, timings, final metrics)."),
    AfterValidator(_check_attrs),
]


class TellRequest(BaseModel):
    """Finish a trial: ``complete`` with ``value`` (or ``values``), ``pruned``, or ``fail`` with a reason."""

    model_config = ConfigDict(extra="forbid")

    state: Literal["complete", "pruned", "fail"]
    value: float | None = None
    values: list[float] | None = Field(default=None, min_length=1, max_length=16)
    reason: Text | None = None
    user_attrs: UserAttrs = None
    worker_id: WorkerId | None = None
    fatal: bool = Field(
        default=False,
        description="state fail only: the failure is the study's, not this trial's (a program whose output "
        "caviar cannot read): the trial is not retried and the study is paused with the reason.",
    )


class EnqueueItem(BaseModel):
    """A parameter set to run (a waiting trial), or with its known result to import (a complete trial)."""

    model_config = ConfigDict(extra="forbid")

    params: dict[Annotated[str, Field(max_length=64)], Scalar] = Field(
        max_length=256, description="Decoded values, as users see them (beta1: 0.95, not one_minus_beta1)."
    )
    value: float | None = Field(default=None, description="A known result: imported as a complete trial.")
    values: list[float] | None = Field(default=None, min_length=1, max_length=16)
    user_attrs: UserAttrs = None


class EnqueueRequest(BaseModel):
    """Parameter sets to enqueue (handed out before newly sampled ones) or import."""

    model_config = ConfigDict(extra="forbid")

    trials: list[EnqueueItem] = Field(min_length=1, max_length=1000)


class TrialRead(BaseModel):
    """A trial as the API shows it (parameters decoded)."""

    number: int
    state: TrialStateName
    params: dict[str, Any]
    value: float | None
    values: list[float] | None
    intermediate_values: dict[int, float]
    user_attrs: dict[str, Any]
    worker_id: str | None
    started_at: datetime | None
    finished_at: datetime | None
    retry_of: int | None
    fail_reason: str | None = None


class TrialList(BaseModel):
    items: list[TrialRead]
    total: int


class ParetoTrials(BaseModel):
    trials: list[TrialRead]


class ArtifactRead(BaseModel):
    """A file stored with a trial (Optuna artifact)."""

    artifact_id: str
    filename: str


class Importances(BaseModel):
    """Parameter importances (decoded names); one set per metric for a multi-objective study."""

    importances: dict[str, float] | dict[str, dict[str, float]] = Field(
        description="{param: importance}; multi-objective: {metric: {param: importance}}."
    )
