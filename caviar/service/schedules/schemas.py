"""Create/Update/Read schemas of schedules and their runs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from caviar.service.definition import NAME_PATTERN
from caviar.service.schedules._cron import CronError, check_cron, parse_timezone

MAX_NAME_LENGTH = 100
"""Schedule names are at most 100 characters, so that ``<name>-<YYYYmmddTHHMM>`` (and the
longer name of a manual run, ``<name>-manual-<YYYYmmddTHHMMSS>``) fit a 128-character study name."""

Misfire = Literal["skip", "run_once"]
Overlap = Literal["allow", "skip_if_running"]
RunOutcome = Literal["pending", "created", "skipped_overlap", "skipped_misfire", "error"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _valid_cron(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_cron(value)
    except CronError as exc:
        raise ValueError(str(exc)) from None


HOST_DEPENDENT_ZONES = ("localtime", "Factory")
"""Zone names whose meaning depends on the host (its local time, a placeholder): refused."""
EARLIEST_END = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_END = datetime(3000, 1, 1, tzinfo=UTC)


def _valid_timezone(value: str | None) -> str | None:
    if value is None:
        return None
    if value in HOST_DEPENDENT_ZONES or value.startswith(("posix/", "right/")):
        raise ValueError(f"{value!r} depends on the host; name an IANA zone such as 'Europe/Berlin'")
    try:
        parse_timezone(value)
    except CronError as exc:
        raise ValueError(str(exc)) from None
    return value


def _valid_end(value: datetime | None) -> datetime | None:
    """A schedule's end is before the year 3000 (and, checked against the scheduler's clock when the
    schedule is created or changed, in the future)."""
    if value is not None and not EARLIEST_END <= value < LATEST_END:
        raise ValueError("must be between the years 2000 and 3000")
    return value


class ScheduleUpdate(_Strict):
    """A partial change of a schedule (PATCH): only the fields given change.

    ``end_at`` and ``max_runs`` accept ``null`` to clear them. ``template`` replaces the whole
    template.
    """

    cron: str | None = Field(default=None, max_length=128, description="5 fields: min hour dom month dow")
    timezone: str | None = Field(default=None, max_length=64, description="IANA name, e.g. Europe/Berlin")
    template: dict[str, Any] | None = Field(default=None, description="A study definition without name")
    enabled: bool | None = None
    misfire: Misfire | None = None
    overlap: Overlap | None = None
    end_at: AwareDatetime | None = None
    max_runs: int | None = Field(default=None, ge=1, le=10_000_000)

    _cron = field_validator("cron")(_valid_cron)
    _timezone = field_validator("timezone")(_valid_timezone)
    _end = field_validator("end_at")(_valid_end)


class ScheduleCreate(_Strict):
    """A new schedule."""

    name: str = Field(pattern=NAME_PATTERN, max_length=MAX_NAME_LENGTH)
    cron: str = Field(max_length=128, description="5 fields: minute hour day-of-month month day-of-week")
    timezone: str = Field(default="UTC", max_length=64, description="IANA name, e.g. Europe/Berlin")
    template: dict[str, Any] = Field(description="A full study definition without its name")
    enabled: bool = True
    misfire: Misfire = Field(default="skip", description="What to do with ticks missed while no service ran")
    overlap: Overlap = Field(default="allow", description="skip_if_running: skip while the last study runs")
    end_at: AwareDatetime | None = Field(default=None, description="No tick after this instant")
    max_runs: int | None = Field(default=None, ge=1, le=10_000_000, description="Stop after this many")

    _cron = field_validator("cron")(_valid_cron)
    _timezone = field_validator("timezone")(_valid_timezone)
    _end = field_validator("end_at")(_valid_end)


class ScheduleRead(BaseModel):
    """A schedule as the API shows it."""

    id: int
    name: str
    cron: str
    timezone: str
    template: dict[str, Any]
    enabled: bool
    misfire: Misfire
    overlap: Overlap
    end_at: datetime | None
    max_runs: int | None
    run_count: int = Field(description="Ticks that created (or tried to create) a study")
    next_run_at: datetime | None = Field(description="Next tick in UTC; null when disabled or finished")
    created_at: datetime
    updated_at: datetime


class ScheduleList(BaseModel):
    items: list[ScheduleRead]
    total: int = Field(ge=0)


class ScheduleRunRead(BaseModel):
    """One tick (or manual run) of a schedule and what came of it, with the study's live state."""

    id: int
    schedule_id: int
    tick_at: datetime
    fired_at: datetime
    study_name: str | None
    study_state: str | None = Field(description="The study's state now; null if none or deleted")
    outcome: RunOutcome
    message: str | None
    manual: bool


class ScheduleRunList(BaseModel):
    items: list[ScheduleRunRead]
    total: int = Field(ge=0)
