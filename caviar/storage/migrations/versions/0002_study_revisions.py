"""study revisions, start time, stop reason and warm start

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Study definitions become editable (PATCH): ``definition_version`` counts the edits so every server
process re-parses a changed definition. ``started_at`` (first trial claimed) anchors
``budget.max_duration_s``; it is filled in for existing studies from their first lease.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from caviar.storage import _models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("caviar_studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("definition_version", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("started_at", _models.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("stop_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("warm_start", sa.JSON(), nullable=True))
    op.execute(
        "UPDATE caviar_studies SET started_at = (SELECT MIN(l.started_at) FROM caviar_trial_leases l "
        "WHERE l.study_id = caviar_studies.id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("caviar_studies", schema=None) as batch_op:
        batch_op.drop_column("warm_start")
        batch_op.drop_column("stop_reason")
        batch_op.drop_column("started_at")
        batch_op.drop_column("definition_version")
