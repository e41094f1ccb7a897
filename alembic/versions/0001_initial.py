"""initial schema: runs, decisions, notices + deliveries (outbox), actions, sweeps, leases

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 255


def _ts(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "reaper_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user", sa.String(NAME), nullable=False),
        sa.Column("server", sa.String(NAME), nullable=False),
        _ts("started", False),
        _ts("first_seen", False),
        _ts("last_seen", False),
        _ts("ended_at"),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.Column("state", sa.String(32), nullable=True),
        _ts("last_activity"),
        _ts("detached_since"),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("user_options", sa.JSON(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("action", sa.String(32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("rule", sa.String(NAME), nullable=True),
        _ts("spell"),
        _ts("stop_at"),
        _ts("next_at"),
        _ts("kept_until"),
        sa.Column("kept_by", sa.String(NAME), nullable=True),
        _ts("stop_requested_at"),
        sa.PrimaryKeyConstraint("id", name="pk_reaper_runs"),
        sa.UniqueConstraint("user", "server", "started", name="uq_reaper_runs_key"),
    )
    op.create_index("ix_reaper_runs_ended_at", "reaper_runs", ["ended_at"])

    op.create_table(
        "reaper_decisions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        _ts("at", False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("rule", sa.String(NAME), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        _ts("spell"),
        _ts("stop_at"),
        _ts("next_at"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["reaper_runs.id"], name="fk_reaper_decisions_run_id_reaper_runs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_reaper_decisions"),
    )
    op.create_index("ix_reaper_decisions_run_id_at", "reaper_decisions", ["run_id", "at"])

    op.create_table(
        "reaper_notices",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        _ts("spell"),
        sa.Column("spell_key", sa.String(40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        _ts("created_at", False),
        sa.Column("channels", sa.JSON(), nullable=False),
        sa.Column("context", sa.JSON(), nullable=False),
        _ts("delivered_at"),
        sa.Column("failed", sa.Boolean(), nullable=False),
        _ts("failed_at"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["reaper_runs.id"], name="fk_reaper_notices_run_id_reaper_runs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_reaper_notices"),
        sa.UniqueConstraint("run_id", "kind", "spell_key", "seq", name="uq_reaper_notices_once"),
    )
    op.create_index("ix_reaper_notices_created_at", "reaper_notices", ["created_at"])

    op.create_table(
        "reaper_deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("notice_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("next_attempt_at"),
        sa.Column("last_error", sa.Text(), nullable=True),
        _ts("delivered_at"),
        _ts("updated_at", False),
        sa.ForeignKeyConstraint(
            ["notice_id"],
            ["reaper_notices.id"],
            name="fk_reaper_deliveries_notice_id_reaper_notices",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_reaper_deliveries"),
        sa.UniqueConstraint("notice_id", "channel", name="uq_reaper_deliveries_channel"),
    )
    op.create_index("ix_reaper_deliveries_due", "reaper_deliveries", ["status", "next_attempt_at"])

    op.create_table(
        "reaper_actions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        _ts("at", False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(NAME), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["reaper_runs.id"], name="fk_reaper_actions_run_id_reaper_runs", ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_reaper_actions"),
    )
    op.create_index("ix_reaper_actions_at", "reaper_actions", ["at"])

    op.create_table(
        "reaper_sweeps",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _ts("started_at", False),
        _ts("finished_at"),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_reaper_sweeps"),
    )
    op.create_index("ix_reaper_sweeps_finished_at", "reaper_sweeps", ["finished_at"])

    op.create_table(
        "reaper_leases",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(NAME), nullable=False),
        _ts("acquired_at", False),
        _ts("expires_at", False),
        sa.PrimaryKeyConstraint("name", name="pk_reaper_leases"),
    )


def downgrade() -> None:
    op.drop_table("reaper_leases")
    op.drop_index("ix_reaper_sweeps_finished_at", table_name="reaper_sweeps")
    op.drop_table("reaper_sweeps")
    op.drop_index("ix_reaper_actions_at", table_name="reaper_actions")
    op.drop_table("reaper_actions")
    op.drop_index("ix_reaper_deliveries_due", table_name="reaper_deliveries")
    op.drop_table("reaper_deliveries")
    op.drop_index("ix_reaper_notices_created_at", table_name="reaper_notices")
    op.drop_table("reaper_notices")
    op.drop_index("ix_reaper_decisions_run_id_at", table_name="reaper_decisions")
    op.drop_table("reaper_decisions")
    op.drop_index("ix_reaper_runs_ended_at", table_name="reaper_runs")
    op.drop_table("reaper_runs")
