"""Read/Create schemas of studies."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

StudyState = Literal["queued", "running", "paused", "completed", "failed"]


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


class StudyList(BaseModel):
    items: list[StudyRead]
    total: int = Field(ge=0)
