"""What the page, the CLI and the metrics read back: actions, notices, the open runs, sweeps; and
the action log they are read from. Rows are frozen dataclasses (times aware UTC)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update

from ..core.model import RunKey
from .db import Database, jsonable
from .models import ACTIONS, DELIVERIES, NOTICES, RUNS, SWEEPS, as_utc
from .runs import run_id


@dataclass(frozen=True)
class ActionRow:
    """Something done to a server or job (stop, keep, scancel ...); the run is unknown (None) for
    an action on no run (an orphan job seen)."""

    id: int
    at: datetime
    user: str | None
    server: str | None
    started: datetime | None
    kind: str
    ok: bool
    detail: str
    actor: str
    job_id: str | None
    user_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChannelStatus:
    """One notice on one channel."""

    channel: str
    status: str  # pending | delivered | failed
    attempts: int
    last_error: str | None
    delivered_at: datetime | None
    next_attempt_at: datetime | None


@dataclass(frozen=True)
class NoticeRow:
    id: int
    user: str
    server: str
    started: datetime
    kind: str
    spell: datetime | None
    seq: int
    created_at: datetime
    delivered_at: datetime | None
    failed: bool
    failed_at: datetime | None
    status: str  # delivered | failed | pending
    channels: tuple[str, ...]
    deliveries: tuple[ChannelStatus, ...]
    reason: str | None


@dataclass(frozen=True)
class RunRow:
    """An open run's latest observation and decision, and what people asked for."""

    id: int
    user: str
    server: str
    started: datetime
    first_seen: datetime
    last_seen: datetime
    ended_at: datetime | None = None
    end_reason: str | None = None
    state: str | None = None
    last_activity: datetime | None = None
    detached_since: datetime | None = None
    job_id: str | None = None
    user_options: dict[str, Any] = field(default_factory=dict)
    detail: str | None = None
    action: str | None = None
    reason: str | None = None
    rule: str | None = None
    spell: datetime | None = None
    stop_at: datetime | None = None
    next_at: datetime | None = None
    kept_until: datetime | None = None
    kept_by: str | None = None
    stop_requested_at: datetime | None = None
    working_at: datetime | None = None  # the last look at which the server was working

    @property
    def key(self) -> RunKey:
        return RunKey(self.user, self.server, self.started)


def _status(delivered_at: datetime | None, failed: bool) -> str:
    return "delivered" if delivered_at else ("failed" if failed else "pending")


class Reports:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record_action(
        self,
        run: RunKey | None,
        kind: str,
        ok: bool,
        detail: str,
        now: datetime,
        *,
        actor: str = "reaper",
        job_id: str | None = None,
    ) -> int:
        now = as_utc(now)
        with self.db.write() as s:
            rid = run_id(self.db, s, run, now) if run is not None else None
            return int(
                s.execute(
                    ACTIONS.insert()
                    .values(run_id=rid, at=now, kind=kind, ok=ok, detail=detail, actor=actor, job_id=job_id)
                    .returning(ACTIONS.c.id)
                ).scalar_one()
            )

    def recent_actions(self, since: datetime, limit: int = 200) -> list[ActionRow]:
        q = (
            select(ACTIONS, RUNS.c.user, RUNS.c.server, RUNS.c.started, RUNS.c.user_options)
            .outerjoin(RUNS, RUNS.c.id == ACTIONS.c.run_id)
            .where(ACTIONS.c.at >= since)
            .order_by(ACTIONS.c.at.desc(), ACTIONS.c.id.desc())
            .limit(limit)
        )
        with self.db.read() as s:
            return [
                ActionRow(id=r.id, at=r.at, user=r.user, server=r.server, started=r.started, kind=r.kind,
                          ok=bool(r.ok), detail=r.detail, actor=r.actor, job_id=r.job_id,
                          user_options=r.user_options or {})
                for r in s.execute(q)
            ]

    def recent_notices(self, since: datetime, limit: int = 200) -> list[NoticeRow]:
        q = (
            select(NOTICES, RUNS.c.user, RUNS.c.server, RUNS.c.started)
            .join(RUNS, RUNS.c.id == NOTICES.c.run_id)
            .where(NOTICES.c.created_at >= since)
            .order_by(NOTICES.c.created_at.desc(), NOTICES.c.id.desc())
            .limit(limit)
        )
        with self.db.read() as s:
            rows = s.execute(q).all()
            per: dict[int, list[ChannelStatus]] = {int(r.id): [] for r in rows}
            if per:
                dq = select(DELIVERIES).where(DELIVERIES.c.notice_id.in_(list(per))).order_by(DELIVERIES.c.id)
                for d in s.execute(dq):
                    per[int(d.notice_id)].append(
                        ChannelStatus(channel=d.channel, status=d.status, attempts=d.attempts,
                                      last_error=d.last_error, delivered_at=d.delivered_at,
                                      next_attempt_at=d.next_attempt_at)
                    )
        return [
            NoticeRow(id=r.id, user=r.user, server=r.server, started=r.started, kind=r.kind, spell=r.spell,
                      seq=r.seq, created_at=r.created_at, delivered_at=r.delivered_at, failed=bool(r.failed),
                      failed_at=r.failed_at, status=_status(r.delivered_at, bool(r.failed)),
                      channels=tuple(r.channels or ()), deliveries=tuple(per[int(r.id)]),
                      reason=(r.context or {}).get("reason"))
            for r in rows
        ]

    def runs_overview(self) -> list[RunRow]:
        """The latest state of every open run, ordered by user and server."""
        q = (
            select(*(c for c in RUNS.c if c.name != "cpu_samples"))  # (the work look's memory: not shown)
            .where(RUNS.c.ended_at.is_(None))
            .order_by(RUNS.c.user, RUNS.c.server, RUNS.c.started)
        )
        with self.db.read() as s:
            return [RunRow(**{**r._mapping, "user_options": r.user_options or {}}) for r in s.execute(q)]

    # ------------------------------------------------------------ sweeps

    def start_sweep(self, now: datetime, *, dry_run: bool) -> int:
        with self.db.write() as s:
            return int(
                s.execute(
                    SWEEPS.insert().values(started_at=now, dry_run=dry_run).returning(SWEEPS.c.id)
                ).scalar_one()
            )

    def finish_sweep(self, sweep_id: int, now: datetime, ok: bool, summary: dict[str, Any]) -> None:
        with self.db.write() as s:
            s.execute(
                update(SWEEPS)
                .where(SWEEPS.c.id == sweep_id)
                .values(finished_at=now, ok=ok, summary=jsonable(summary))
            )

    def last_successful_sweep(self) -> datetime | None:
        with self.db.read() as s:
            t = s.execute(select(func.max(SWEEPS.c.finished_at)).where(SWEEPS.c.ok.is_(True))).scalar_one()
        if t is None:
            return None
        # func.max() loses the column type on some dialects: coerce back to aware UTC
        if isinstance(t, str):
            t = datetime.fromisoformat(t)
        return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
