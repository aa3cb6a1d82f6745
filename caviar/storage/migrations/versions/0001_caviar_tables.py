"""caviar tables

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from caviar.storage import _models

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "caviar_api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", _models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", _models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", _models.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_table(
        "caviar_schedules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("cron", sa.String(length=128), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("template", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("misfire", sa.String(length=16), nullable=False),
        sa.Column("overlap", sa.String(length=24), nullable=False),
        sa.Column("next_run_at", _models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("end_at", _models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("max_runs", sa.Integer(), nullable=True),
        sa.Column("run_count", sa.Integer(), nullable=False),
        sa.Column("created_at", _models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", _models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("caviar_schedules", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_caviar_schedules_next_run_at"), ["next_run_at"], unique=False)

    op.create_table(
        "caviar_workers",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("current_trials", sa.JSON(), nullable=False),
        sa.Column("started_at", _models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", _models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "caviar_schedule_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("schedule_id", sa.Integer(), nullable=False),
        sa.Column("tick_at", _models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("fired_at", _models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("study_name", sa.String(length=128), nullable=True),
        sa.Column("outcome", sa.String(length=24), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("manual", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["schedule_id"], ["caviar_schedules.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("schedule_id", "tick_at", name="uq_caviar_schedule_run_tick"),
    )
    with op.batch_alter_table("caviar_schedule_runs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_caviar_schedule_runs_schedule_id"), ["schedule_id"], unique=False
        )

    op.create_table(
        "caviar_studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("objective_kind", sa.String(length=16), nullable=False),
        sa.Column("optuna_study_id", sa.Integer(), nullable=False),
        sa.Column("schedule_id", sa.Integer(), nullable=True),
        sa.Column("created_at", _models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", _models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["schedule_id"], ["caviar_schedules.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("caviar_studies", schema=None) as batch_op:
        batch_op.create_index("ix_caviar_studies_queue", ["state", "priority", "created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_caviar_studies_state"), ["state"], unique=False)

    op.create_table(
        "caviar_trial_leases",
        sa.Column("trial_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(length=128), nullable=True),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("retry_of", sa.Integer(), nullable=True),
        sa.Column("started_at", _models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", _models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("deadline_at", _models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["caviar_studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("trial_id"),
        sa.UniqueConstraint("study_id", "number", name="uq_caviar_lease_study_number"),
        sa.UniqueConstraint("study_id", "request_id", name="uq_caviar_lease_request"),
    )
    with op.batch_alter_table("caviar_trial_leases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_caviar_trial_leases_expires_at"), ["expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_caviar_trial_leases_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_caviar_trial_leases_study_id"), ["study_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("caviar_trial_leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_caviar_trial_leases_study_id"))
        batch_op.drop_index(batch_op.f("ix_caviar_trial_leases_status"))
        batch_op.drop_index(batch_op.f("ix_caviar_trial_leases_expires_at"))

    op.drop_table("caviar_trial_leases")
    with op.batch_alter_table("caviar_studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_caviar_studies_state"))
        batch_op.drop_index("ix_caviar_studies_queue")

    op.drop_table("caviar_studies")
    with op.batch_alter_table("caviar_schedule_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_caviar_schedule_runs_schedule_id"))

    op.drop_table("caviar_schedule_runs")
    op.drop_table("caviar_workers")
    with op.batch_alter_table("caviar_schedules", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_caviar_schedules_next_run_at"))

    op.drop_table("caviar_schedules")
    op.drop_table("caviar_api_tokens")
