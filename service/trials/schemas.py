"""Request and response schemas of the trial lifecycle."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TrialStateName = Literal["waiting", "running", "complete", "pruned", "fail"]


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker_id: str | None = Field(default=None, max_length=128, description="Who runs the trial.")
    request_id: str | None = Field(
        default=None, min_length=1, max_length=128, description="Repeat an ask safely: same id, same trial."
    )


class TrialAssignment(BaseModel):
    """What an ask hands out: a trial to run, with decoded parameters and its lease."""

    study: str
    number: int
    params: dict[str, Any]
    heartbeat_interval_s: float
    lease_expires_at: datetime
    retry_of: int | None = None


class ReportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=0, le=2**31 - 1)
    value: float


class ReportResponse(BaseModel):
    should_prune: bool


class HeartbeatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker_id: str | None = Field(default=None, max_length=128)


class TellRequest(BaseModel):
    """Finish a trial: ``complete`` with ``value`` (or ``values``), ``pruned``, or ``fail`` with a reason."""

    model_config = ConfigDict(extra="forbid")

    state: Literal["complete", "pruned", "fail"]
    value: float | None = None
    values: list[float] | None = Field(default=None, min_length=1, max_length=16)
    reason: str | None = Field(default=None, max_length=2000)


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


class Importances(BaseModel):
    importances: dict[str, float]


class RefineRequest(BaseModel):
    """How to narrow the space around the best trials."""

    model_config = ConfigDict(extra="forbid")

    top_fraction: float = Field(default=0.2, gt=0, le=1, description="Share of complete trials kept.")
    min_top: int = Field(default=3, ge=1, le=1000, description="Keep at least this many trials.")
    margin: float = Field(default=0.25, ge=0, le=10, description="Widen each envelope by this share.")
    n_trials: int | None = Field(default=None, ge=1, le=1_000_000)
