"""caviar's own tables (Optuna keeps its trial tables in the same database)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

VERSION_TABLE = "caviar_alembic_version"
"""Alembic version table of caviar's migrations (Optuna keeps its own ``alembic_version``)."""


def utcnow() -> datetime:
    """Timezone-aware now in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of caviar's tables; every table name starts with ``caviar_``."""

    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}


class StudyRecord(Base):
    """A caviar study: its definition and state. The Optuna study has the same name.

    ``state`` is queued, running, paused, completed, failed, stopping (a stop was asked for while
    trials still run) or stopped.
    """

    __tablename__ = "caviar_studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    definition: Mapped[dict[str, Any]]
    priority: Mapped[int] = mapped_column(Integer, default=0)
    objective_kind: Mapped[str] = mapped_column(String(16), default="external")
    optuna_study_id: Mapped[int] = mapped_column(Integer)
    schedule_id: Mapped[int | None] = mapped_column(
        ForeignKey("caviar_schedules.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    definition_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    """Bumped by every edit of ``definition``: each process re-parses a definition when it changes."""
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    """When the first trial was claimed (``budget.max_duration_s`` counts from here)."""
    stop_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Why a ``stopping``/``stopped`` study ended: a person, its goal or its deadline."""
    warm_start: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    """What the definition's warm start enqueued: ``{from, enqueued, skipped, reasons}``."""

    __table_args__ = (Index("ix_caviar_studies_queue", "state", "priority", "created_at"),)


class TrialLease(Base):
    """caviar's bookkeeping for one Optuna trial handed out by an ask.

    ``status`` is ``active`` while the trial runs, ``finished`` once told, ``reaped`` when its lease
    lapsed (the trial was failed and, budget permitting, re-queued), ``released`` when handed back.
    """

    __tablename__ = "caviar_trial_leases"

    trial_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    study_id: Mapped[int] = mapped_column(ForeignKey("caviar_studies.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="active", index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    retry_of: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    deadline_at: Mapped[datetime | None] = mapped_column(nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        UniqueConstraint("study_id", "number", name="uq_caviar_lease_study_number"),
        UniqueConstraint("study_id", "request_id", name="uq_caviar_lease_request"),
    )


class Schedule(Base):
    """A cron schedule that creates one study per tick from a template."""

    __tablename__ = "caviar_schedules"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    cron: Mapped[str] = mapped_column(String(128))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    template: Mapped[dict[str, Any]]
    enabled: Mapped[bool] = mapped_column(default=True)
    misfire: Mapped[str] = mapped_column(String(16), default="skip")
    overlap: Mapped[str] = mapped_column(String(24), default="allow")
    next_run_at: Mapped[datetime | None] = mapped_column(nullable=True, index=True)
    end_at: Mapped[datetime | None] = mapped_column(nullable=True)
    max_runs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    run_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ScheduleRun(Base):
    """One tick of a schedule and what came of it."""

    __tablename__ = "caviar_schedule_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    schedule_id: Mapped[int] = mapped_column(
        ForeignKey("caviar_schedules.id", ondelete="CASCADE"), index=True
    )
    tick_at: Mapped[datetime]
    fired_at: Mapped[datetime] = mapped_column(default=utcnow)
    study_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    outcome: Mapped[str] = mapped_column(String(24))
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    manual: Mapped[bool] = mapped_column(default=False)

    __table_args__ = (UniqueConstraint("schedule_id", "tick_at", name="uq_caviar_schedule_run_tick"),)


class WorkerRecord(Base):
    """A worker process slot (one device slot of ``caviar worker``)."""

    __tablename__ = "caviar_workers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="idle")
    current_trials: Mapped[dict[str, Any]] = mapped_column(default=dict)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """An API token; only its SHA-256 hash is stored."""

    __tablename__ = "caviar_api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    scope: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
