"""The reaper's tables (SQLAlchemy 2 declarative models).

Every table is prefixed ``reaper_`` and alembic's version table is ``reaper_alembic_version``, so the
reaper can share a PostgreSQL database with JupyterHub itself (which has its own ``alembic_version``).
The schema is created and changed only by the migrations in ``migrations/versions``; these models
must match them (a test compares the two).

Times: :class:`UTCDateTime` stores timezone-aware UTC everywhere. PostgreSQL keeps
``timestamp with time zone``; SQLite has no time zone, so UTC is stored as a fixed-width text
(``YYYY-MM-DD HH:MM:SS.ffffff``) that sorts and compares correctly, and is returned aware.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAME_LEN = 255  # user and server names (any Unicode)

# Constraint names are fixed so that migrations (and batch mode on SQLite) can refer to them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def as_utc(value: datetime) -> datetime:
    """An aware UTC datetime. Naive input is refused: every time in the reaper is aware."""
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValueError(f"naive datetime {value!r}: the store takes timezone-aware datetimes only")
    return value.astimezone(UTC)


def spell_key(spell: datetime | None) -> str:
    """The idempotency key of a spell: its UTC instant in microseconds, '' for run-wide notices.

    (A NULL in a unique constraint never conflicts, in SQLite or PostgreSQL, so the key is text.)"""
    return "" if spell is None else as_utc(spell).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in, timezone-aware UTC out, on every database."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        utc = as_utc(value)
        if dialect.name == "sqlite":
            return utc.replace(tzinfo=None)
        return utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[str]: JSON()}


class Run(Base):
    """One server run (user, server name, started): its latest observation and decision."""

    __tablename__ = "reaper_runs"
    __table_args__ = (
        UniqueConstraint("user", "server", "started", name="uq_reaper_runs_key"),
        Index("ix_reaper_runs_ended_at", "ended_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column(String(NAME_LEN))
    server: Mapped[str] = mapped_column(String(NAME_LEN))
    started: Mapped[datetime] = mapped_column(UTCDateTime())
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    end_reason: Mapped[str | None] = mapped_column(Text)
    # the latest observation
    state: Mapped[str | None] = mapped_column(String(32))
    last_activity: Mapped[datetime | None] = mapped_column(UTCDateTime())
    detached_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    job_id: Mapped[str | None] = mapped_column(String(64))
    user_options: Mapped[dict[str, Any] | None] = mapped_column(JSON())
    detail: Mapped[str | None] = mapped_column(Text)
    # the latest decision
    action: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    rule: Mapped[str | None] = mapped_column(String(NAME_LEN))
    spell: Mapped[datetime | None] = mapped_column(UTCDateTime())
    stop_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    next_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # what people and the reaper asked for
    kept_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    kept_by: Mapped[str | None] = mapped_column(String(NAME_LEN))
    stop_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class DecisionLog(Base):
    """A change of (action, state, rule) for a run: a log of changes, not of every sweep."""

    __tablename__ = "reaper_decisions"
    __table_args__ = (Index("ix_reaper_decisions_run_id_at", "run_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("reaper_runs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    state: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(32))
    rule: Mapped[str] = mapped_column(String(NAME_LEN))
    reason: Mapped[str] = mapped_column(Text)
    spell: Mapped[datetime | None] = mapped_column(UTCDateTime())
    stop_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    next_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Notice(Base):
    """A notice to a user (the outbox): at most one per (run, kind, spell, seq)."""

    __tablename__ = "reaper_notices"
    __table_args__ = (
        UniqueConstraint("run_id", "kind", "spell_key", "seq", name="uq_reaper_notices_once"),
        Index("ix_reaper_notices_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("reaper_runs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    spell: Mapped[datetime | None] = mapped_column(UTCDateTime())
    spell_key: Mapped[str] = mapped_column(String(40))
    seq: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    channels: Mapped[list[str]] = mapped_column(JSON())
    context: Mapped[dict[str, Any]] = mapped_column(JSON())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failed: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class DeliveryRow(Base):
    """One notice on one channel: pending -> delivered | failed (permanently)."""

    __tablename__ = "reaper_deliveries"
    __table_args__ = (
        UniqueConstraint("notice_id", "channel", name="uq_reaper_deliveries_channel"),
        Index("ix_reaper_deliveries_due", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    notice_id: Mapped[int] = mapped_column(ForeignKey("reaper_notices.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ActionRow(Base):
    """Something done to a server or job (stop, stop-pending, stop-failed, scancel, orphan-cancel, keep ...)."""

    __tablename__ = "reaper_actions"
    __table_args__ = (Index("ix_reaper_actions_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("reaper_runs.id", ondelete="SET NULL"))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(32))
    ok: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(NAME_LEN))
    job_id: Mapped[str | None] = mapped_column(String(64))


class Sweep(Base):
    __tablename__ = "reaper_sweeps"
    __table_args__ = (Index("ix_reaper_sweeps_finished_at", "finished_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    dry_run: Mapped[bool] = mapped_column(Boolean)
    ok: Mapped[bool | None] = mapped_column(Boolean)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON())


class Lease(Base):
    """The single-active-reaper lease: one row per lease name, held until expires_at."""

    __tablename__ = "reaper_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(NAME_LEN))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class SlackLookup(Base):
    """A cached Slack users.lookupByEmail answer (user_id None: "no such Slack user")."""

    __tablename__ = "reaper_slack_lookups"

    email: Mapped[str] = mapped_column(String(320), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
