"""Worker schemas: registration, the one heartbeat for all of a worker's leases, the queue."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from caviar.service.types import Credential

WORKER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
WorkerId = Annotated[str, Field(pattern=WORKER_ID_PATTERN, description="Unique per worker slot.")]


class WorkerRead(BaseModel):
    id: str
    host: str
    pid: int
    device: str
    status: str
    live: bool
    current_trials: list[dict[str, Any]]
    started_at: datetime
    last_seen_at: datetime


class WorkerRegistered(WorkerRead):
    heartbeat_interval_s: float = Field(description="Beat at least this often to keep leases.")
    credential: str | None = Field(
        default=None,
        description="With tokens on: the proof that this registration holds the worker id; a "
        "worker-scope token sends it with every heartbeat of the id (never shown again).",
    )


class WorkerList(BaseModel):
    items: list[WorkerRead]
    total: int


class WorkerRegister(BaseModel):
    """A worker slot announcing itself."""

    model_config = ConfigDict(extra="forbid")

    id: WorkerId
    host: str = Field(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")
    pid: int = Field(ge=0, le=2**31 - 1)
    device: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9:_-]+$")


class TrialKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    study: str = Field(min_length=1, max_length=128)
    number: int = Field(ge=0, le=2**31 - 1)


class TrialRef(TrialKey):
    """A trial a worker holds, with the proof of its claim."""

    credential: Credential | None = Field(
        default=None,
        description="The credential the trial's ask answered: a worker-scope token must send it "
        "to renew the lease (with tokens on).",
    )


class WorkerHeartbeat(BaseModel):
    """Renew the leases of every trial the worker runs, and say what it is doing."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["idle", "busy", "stopped"] = "busy"
    credential: str | None = Field(
        default=None,
        max_length=512,
        description="The credential the worker's registration answered: a worker-scope token must "
        "send it (with tokens on), else 409 not_your_worker.",
    )
    # a slot holds one trial, or one fused group: 1,000 is far above any; it keeps the largest valid
    # body (each credential up to 512 characters) under the request size cap, so too many is a 422
    trials: list[TrialRef] = Field(default_factory=list, max_length=1_000)


class LostTrial(TrialKey):
    code: str = Field(
        description="lease_lost, trial_finished, not_your_trial, trial_not_found or study_stopped (prune it)"
    )


class HeartbeatResult(BaseModel):
    """The trials the worker must stop: their leases were not renewed."""

    lost: list[LostTrial]


class QueueItem(BaseModel):
    """A study that hands out trials, as workers see it."""

    name: str
    state: str
    priority: int
    objective_kind: str
    metrics: list[str] = Field(description="The optimised metrics, one per direction, in order.")
    trials_started: int = Field(description="Trials the study has started so far (every state).")
    warmup_trials: int = Field(
        description="Start-up trials its sampler draws before modelling (run unfused)."
    )
    definition: dict[str, Any]
    created_at: datetime


class QueueList(BaseModel):
    items: list[QueueItem]
