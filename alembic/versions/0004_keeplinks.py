"""One-click keep links: the used ones, and the reaper's own secrets (the links' signing key)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reaper_keep_links",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user", sa.String(255), nullable=False),
        sa.Column("server", sa.String(255), nullable=False),
        sa.Column("notice_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_reaper_keep_links"),
    )
    op.create_table(
        "reaper_secrets",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_reaper_secrets"),
    )


def downgrade() -> None:
    op.drop_table("reaper_secrets")
    op.drop_table("reaper_keep_links")
