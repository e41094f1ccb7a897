"""The outbox: notices queued for delivery, one delivery per channel, each pending until it is
delivered or has failed for good (the notify package's Outbox drains it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update

from ..core.model import NoticeKind, RunKey
from .context import NoticeContext
from .db import Database
from .models import DELIVERIES, NOTICES, RUNS, as_utc
from .notices import NoticeSpec, queue_notice
from .runs import run_id


@dataclass(frozen=True)
class Delivery:
    """One notice due on one channel (what a channel's ``deliver`` gets)."""

    id: int
    notice_id: int
    run: RunKey
    kind: NoticeKind
    channel: str
    attempts: int  # failed attempts so far
    context: NoticeContext = field(default_factory=NoticeContext)
    spell: datetime | None = None
    created_at: datetime | None = None
    seq: int = 0  # a reminder's number among its spell's reminders (1, 2, ...); 0 for other kinds


class Outbox:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add_notice(
        self,
        run: RunKey,
        kind: NoticeKind,
        spell: datetime | None,
        now: datetime,
        *,
        channels: list[str],
        context: NoticeContext,
    ) -> int | None:
        """Queue a notice outside a sweep's decision ('stopped', 'orphan'); idempotent like runs.record()."""
        now = as_utc(now)
        with self.db.write() as s:
            spec = NoticeSpec(run_id(self.db, s, run, now), NoticeKind(kind), spell, channels, context)
            return queue_notice(self.db, s, spec, now)

    def due_deliveries(self, now: datetime, limit: int = 100) -> list[Delivery]:
        q = (
            select(
                DELIVERIES.c.id,
                DELIVERIES.c.notice_id,
                DELIVERIES.c.channel,
                DELIVERIES.c.attempts,
                NOTICES.c.kind,
                NOTICES.c.context,
                NOTICES.c.spell,
                NOTICES.c.created_at,
                NOTICES.c.seq,
                RUNS.c.user,
                RUNS.c.server,
                RUNS.c.started,
            )
            .join(NOTICES, NOTICES.c.id == DELIVERIES.c.notice_id)
            .join(RUNS, RUNS.c.id == NOTICES.c.run_id)
            .where(DELIVERIES.c.status == "pending", DELIVERIES.c.next_attempt_at <= now)
            .order_by(DELIVERIES.c.next_attempt_at, DELIVERIES.c.id)
            .limit(limit)
        )
        with self.db.read() as s:
            return [
                Delivery(
                    id=int(r.id),
                    notice_id=int(r.notice_id),
                    run=RunKey(r.user, r.server, r.started),
                    kind=NoticeKind(r.kind),
                    channel=r.channel,
                    attempts=int(r.attempts),
                    context=NoticeContext.from_json(r.context),
                    spell=r.spell,
                    created_at=r.created_at,
                    seq=int(r.seq or 0),
                )
                for r in s.execute(q)
            ]

    def mark_delivered(self, delivery_id: int, now: datetime) -> None:
        self.mark_delivered_many([(delivery_id, now)])

    def mark_delivered_many(self, items: Sequence[tuple[int, datetime]]) -> None:
        """Deliveries done, each at its own time, in one transaction. A notice is delivered when
        its first channel delivers it (a second channel keeps the first time)."""
        by_time: dict[datetime, list[int]] = {}
        for delivery_id, at in items:
            by_time.setdefault(at, []).append(int(delivery_id))
        with self.db.write() as s:
            for at, ids in sorted(by_time.items()):
                for i in range(0, len(ids), 500):
                    nids = s.execute(
                        update(DELIVERIES)
                        .where(DELIVERIES.c.id.in_(ids[i : i + 500]), DELIVERIES.c.status == "pending")
                        .values(status="delivered", delivered_at=at, updated_at=at, next_attempt_at=None)
                        .returning(DELIVERIES.c.notice_id)
                    ).scalars().all()
                    if nids:
                        s.execute(
                            update(NOTICES)
                            .where(NOTICES.c.id.in_(sorted(set(nids))), NOTICES.c.delivered_at.is_(None))
                            .values(delivered_at=at)
                        )

    def mark_failed(
        self,
        delivery_id: int,
        now: datetime,
        error: str,
        *,
        permanent: bool,
        retry_at: datetime | None,
    ) -> None:
        """A failed attempt. Temporary: pending again at ``retry_at`` (default now). Permanent: the
        delivery is failed; when every channel of the notice failed so, the notice is failed."""
        with self.db.write() as s:
            values: dict[str, Any] = {
                "attempts": DELIVERIES.c.attempts + 1,
                "last_error": error[:4000],
                "updated_at": now,
            }
            if permanent:
                values.update(status="failed", next_attempt_at=None)
            else:
                values.update(next_attempt_at=retry_at or now)
            nid = s.execute(
                update(DELIVERIES)
                .where(DELIVERIES.c.id == delivery_id, DELIVERIES.c.status == "pending")
                .values(values)
                .returning(DELIVERIES.c.notice_id)
            ).scalar_one_or_none()
            if nid is None or not permanent:
                return
            statuses = (
                s.execute(select(DELIVERIES.c.status).where(DELIVERIES.c.notice_id == nid)).scalars().all()
            )
            if statuses and all(st == "failed" for st in statuses):
                s.execute(
                    update(NOTICES)
                    .where(NOTICES.c.id == nid, NOTICES.c.failed.is_(False))
                    .values(failed=True, failed_at=now)
                )

    def depth(self) -> int:
        """Deliveries still pending."""
        with self.db.read() as s:
            return int(
                s.execute(
                    select(func.count()).select_from(DELIVERIES).where(DELIVERIES.c.status == "pending")
                ).scalar_one()
            )
