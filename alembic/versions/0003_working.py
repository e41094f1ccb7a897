"""The look at the job's work (state `working`): the last look at which a run was working, and its
programs' CPU samples, kept across sweeps and restarts

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reaper_runs") as batch:
        batch.add_column(sa.Column("working_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("cpu_samples", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reaper_runs") as batch:
        batch.drop_column("cpu_samples")
        batch.drop_column("working_at")
