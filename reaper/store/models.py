"""The reaper's tables (SQLAlchemy Core: the reaper reads and writes them with Core statements only,
and the ORM would be ~6 MB of a long-running service's memory for nothing).

Every table is prefixed ``reaper_`` and alembic's version table is ``reaper_alembic_version``, so the
reaper can share a PostgreSQL database with JupyterHub itself (which has its own ``alembic_version``).
The schema is created and changed only by the migrations in ``alembic/versions``; these tables
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
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

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


metadata = MetaData(naming_convention=NAMING)


def _c(name: str, type_: TypeEngine[Any] | type[TypeEngine[Any]], null: bool = False, **kw: Any) -> Column[Any]:
    """A column, NOT NULL unless ``null``."""
    return Column(name, type_, nullable=null, **kw)


def _id() -> Column[Any]:
    return Column("id", Integer, primary_key=True, autoincrement=True)


def _ref(name: str, target: str, ondelete: str, null: bool = False) -> Column[Any]:
    """A reference to another table's id."""
    return Column(name, Integer, ForeignKey(target, ondelete=ondelete), nullable=null)


# One server run (user, server name, started): its latest observation and decision.
RUNS = Table(
    "reaper_runs", metadata,
    _id(),
    _c("user", String(NAME_LEN)),
    _c("server", String(NAME_LEN)),
    _c("started", UTCDateTime()),
    _c("first_seen", UTCDateTime()),
    _c("last_seen", UTCDateTime()),
    _c("ended_at", UTCDateTime(), True),
    _c("end_reason", Text, True),
    # the latest observation
    _c("state", String(32), True),
    _c("last_activity", UTCDateTime(), True),
    _c("detached_since", UTCDateTime(), True),
    _c("job_id", String(64), True),
    _c("user_options", JSON(), True),
    _c("detail", Text, True),
    # the latest decision
    _c("action", String(32), True),
    _c("reason", Text, True),
    _c("rule", String(NAME_LEN), True),
    _c("spell", UTCDateTime(), True),
    _c("stop_at", UTCDateTime(), True),
    _c("next_at", UTCDateTime(), True),
    # what people and the reaper asked for
    _c("kept_until", UTCDateTime(), True),
    _c("kept_by", String(NAME_LEN), True),
    _c("stop_requested_at", UTCDateTime(), True),
    # the look at the job's work, kept across sweeps (core.model.WorkMemory): the last look at which
    # the server was working, and its programs' CPU at the last look
    _c("working_at", UTCDateTime(), True),
    _c("cpu_samples", JSON(), True),
    UniqueConstraint("user", "server", "started", name="uq_reaper_runs_key"),
    Index("ix_reaper_runs_ended_at", "ended_at"),
)

# A change of (action, state, rule) for a run: a log of changes, not of every sweep.
DECISIONS = Table(
    "reaper_decisions", metadata,
    _id(),
    _ref("run_id", "reaper_runs.id", "CASCADE"),
    _c("at", UTCDateTime()),
    _c("state", String(32)),
    _c("action", String(32)),
    _c("rule", String(NAME_LEN)),
    _c("reason", Text),
    _c("spell", UTCDateTime(), True),
    _c("stop_at", UTCDateTime(), True),
    _c("next_at", UTCDateTime(), True),
    Index("ix_reaper_decisions_run_id_at", "run_id", "at"),
)

# A notice to a user (the outbox): at most one per (run, kind, spell, seq).
NOTICES = Table(
    "reaper_notices", metadata,
    _id(),
    _ref("run_id", "reaper_runs.id", "CASCADE"),
    _c("kind", String(16)),
    _c("spell", UTCDateTime(), True),
    _c("spell_key", String(40)),
    _c("seq", Integer),
    _c("created_at", UTCDateTime()),
    _c("channels", JSON()),
    _c("context", JSON()),
    _c("delivered_at", UTCDateTime(), True),
    _c("failed", Boolean, default=False),
    _c("failed_at", UTCDateTime(), True),
    UniqueConstraint("run_id", "kind", "spell_key", "seq", name="uq_reaper_notices_once"),
    Index("ix_reaper_notices_created_at", "created_at"),
)

# One notice on one channel: pending -> delivered | failed (permanently).
DELIVERIES = Table(
    "reaper_deliveries", metadata,
    _id(),
    _ref("notice_id", "reaper_notices.id", "CASCADE"),
    _c("channel", String(32)),
    _c("status", String(16)),  # pending | delivered | failed
    _c("attempts", Integer, default=0),
    _c("next_attempt_at", UTCDateTime(), True),
    _c("last_error", Text, True),
    _c("delivered_at", UTCDateTime(), True),
    _c("updated_at", UTCDateTime()),
    UniqueConstraint("notice_id", "channel", name="uq_reaper_deliveries_channel"),
    Index("ix_reaper_deliveries_due", "status", "next_attempt_at"),
)

# Something done to a server or job (stop, stop-pending, stop-failed, scancel, orphan-cancel, keep ...).
ACTIONS = Table(
    "reaper_actions", metadata,
    _id(),
    _ref("run_id", "reaper_runs.id", "SET NULL", True),
    _c("at", UTCDateTime()),
    _c("kind", String(32)),
    _c("ok", Boolean),
    _c("detail", Text),
    _c("actor", String(NAME_LEN)),
    _c("job_id", String(64), True),
    Index("ix_reaper_actions_at", "at"),
)

SWEEPS = Table(
    "reaper_sweeps", metadata,
    _id(),
    _c("started_at", UTCDateTime()),
    _c("finished_at", UTCDateTime(), True),
    _c("dry_run", Boolean),
    _c("ok", Boolean, True),
    _c("summary", JSON(), True),
    Index("ix_reaper_sweeps_finished_at", "finished_at"),
)

# The single-active-reaper lease: one row per lease name, held until expires_at.
LEASES = Table(
    "reaper_leases", metadata,
    Column("name", String(64), primary_key=True),
    _c("holder", String(NAME_LEN)),
    _c("acquired_at", UTCDateTime()),
    _c("expires_at", UTCDateTime()),
)

# A cached Slack users.lookupByEmail answer (user_id None: "no such Slack user").
SLACK_LOOKUPS = Table(
    "reaper_slack_lookups", metadata,
    Column("email", String(320), primary_key=True),
    _c("user_id", String(64), True),
    _c("expires_at", UTCDateTime()),
)

# A one-click keep link that was used (reaper/notify/keeplinks.py): by its id (SHA-256 of the
# token), so a link works once; the primary key makes two presses at the same moment one.
KEEP_LINKS = Table(
    "reaper_keep_links", metadata,
    Column("id", String(64), primary_key=True),
    _c("used_at", UTCDateTime()),
    _c("user", String(NAME_LEN)),
    _c("server", String(NAME_LEN)),
    _c("notice_id", Integer, True),
)

# Secrets the reaper makes for itself once and keeps (the keep links' signing key, when
# web.link_secret is not configured).
SECRETS = Table(
    "reaper_secrets", metadata,
    Column("name", String(64), primary_key=True),
    _c("value", String(256)),
    _c("created_at", UTCDateTime()),
)
