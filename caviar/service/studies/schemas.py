"""Read/Create schemas of studies."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from caviar.service.definition import MAX_SECONDS, Goal
from caviar.service.types import TagText, no_nul

StudyState = Literal["queued", "running", "paused", "completed", "failed", "stopping", "stopped"]
"""queued -> running -> completed, paused in between; failed (too many failed trials); stopping
(a stop was asked for, by a person, the goal or the deadline, while trials still run) -> stopped."""


class TrialCounts(BaseModel):
    waiting: int = 0
    running: int = 0
    complete: int = 0
    pruned: int = 0
    fail: int = 0


class BestTrial(BaseModel):
    number: int
    value: float
    params: dict[str, Any]


class ParetoTrial(BaseModel):
    number: int
    values: list[float]
    params: dict[str, Any]


class ParetoFront(BaseModel):
    trials: list[ParetoTrial]


class SkippedTrial(BaseModel):
    number: int
    reason: str


class WarmStartRead(BaseModel):
    """What a warm start enqueued: the best complete trials of ``from`` that fit the space."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    source: str = Field(alias="from")
    enqueued: int
    skipped: int
    reasons: list[SkippedTrial] = Field(
        default_factory=list, description="Why trials were skipped (10 at most)."
    )


class StudyRead(BaseModel):
    """A study as the API shows it."""

    name: str
    state: StudyState
    definition: dict[str, Any]
    sampler: dict[str, Any] = Field(
        description="The sampler the study uses: for ``auto``, the rule that chose and its stages "
        "(sampler and options from a trial number on); also the Optuna study attribute caviar:sampler."
    )
    trial_counts: TrialCounts
    best: BestTrial | ParetoFront | None
    priority: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = Field(default=None, description="When the first trial was claimed.")
    stop_reason: str | None = Field(
        default=None, description="Why a stopping/stopped study ended, or why caviar paused it."
    )
    definition_version: int = Field(default=1, description="Bumped by every edit of the definition.")
    warm_start: WarmStartRead | None = None


_MAX_PRIORITY = 1_000_000


def _not_null(value: Any) -> Any:
    """A field sent as ``null`` that has no "no limit" meaning: refused, never silently ignored."""
    if value is None:
        raise ValueError("may not be null (leave the field out to keep its value)")
    return value


class BudgetUpdate(BaseModel):
    """Budget fields a running study may change; ``null`` removes an optional limit.

    Types are strict: ``"10"`` or ``true`` is not a number of trials.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    n_trials: int | None = Field(default=None, ge=1, le=1_000_000, description="Never below the trials used.")
    max_parallel: int | None = Field(default=None, ge=1, le=100_000)
    max_failed_trials: int | None = Field(default=None, ge=0, le=1_000_000)
    trial_timeout_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    max_retries: int | None = Field(default=None, ge=0, le=100)
    goal: Goal | None = None
    max_duration_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)

    _required = field_validator("n_trials", "max_retries", "max_failed_trials", mode="before")(_not_null)


class StudyUpdate(BaseModel):
    """A change to a study (JSON merge patch: only the fields given change).

    ``tags`` merge into the study's tags; a tag set to ``null`` is removed. Types are strict, and
    ``null`` for ``budget``, ``priority`` or ``tags`` is refused (it would mean nothing).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    budget: BudgetUpdate | None = None
    priority: int | None = Field(default=None, ge=-_MAX_PRIORITY, le=_MAX_PRIORITY)
    tags: dict[TagText, TagText | None] | None = Field(default=None, max_length=64)

    _required = field_validator("budget", "priority", "tags", mode="before")(_not_null)


class StopRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(max_length=500), AfterValidator(no_nul)] | None = Field(
        default=None, description="Recorded as the stop reason."
    )


class StudyList(BaseModel):
    items: list[StudyRead]
    total: int = Field(ge=0)


class RefineRequest(BaseModel):
    """How to narrow the space around the best trials."""

    model_config = ConfigDict(extra="forbid")

    top_fraction: float = Field(default=0.2, gt=0, le=1, description="Share of complete trials kept.")
    min_top: int = Field(default=3, ge=1, le=1000, description="Keep at least this many trials.")
    margin: float = Field(default=0.25, ge=0, le=10, description="Widen each envelope by this share.")
    n_trials: int | None = Field(default=None, ge=1, le=1_000_000)
