"""Slack users.lookupByEmail answers, cached with an expiry

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reaper_slack_lookups",
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("email", name="pk_reaper_slack_lookups"),
    )


def downgrade() -> None:
    op.drop_table("reaper_slack_lookups")
