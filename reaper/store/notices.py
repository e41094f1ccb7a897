"""Queueing notices inside a transaction: a notice row and one pending delivery per channel, at
most once per (run, kind, spell, seq). Shared by the runs repository (a sweep's decisions and
stops queue notices in the transaction that records them) and the outbox (notices queued alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from ..core.model import NoticeKind
from .context import NoticeContext
from .db import Database
from .models import DELIVERIES, NOTICES, spell_key

# Notices of these kinds go out at most once per spell (run-wide when the spell is None): seq 0.
# Reminders are numbered 1..n within their spell.
_NUMBERED = {NoticeKind.REMINDER}
_SLICE = 100  # notices per statement: their parameters are built per slice


@dataclass(frozen=True)
class NoticeSpec:
    """One notice to queue for a run already in the store."""

    run_id: int
    kind: NoticeKind
    spell: datetime | None
    channels: Sequence[str]
    context: NoticeContext


def _channels(channels: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(channels)) or ["log"]


def _deliveries(notice_id: int, channels: Sequence[str], now: datetime) -> list[dict[str, Any]]:
    return [{"notice_id": notice_id, "channel": ch, "status": "pending", "attempts": 0,
             "next_attempt_at": now, "updated_at": now} for ch in _channels(channels)]


def queue_notices(db: Database, s: Connection, specs: Sequence[NoticeSpec], now: datetime) -> list[int | None]:
    """Many notices: one multi-row INSERT for the notices and one for their deliveries (a sweep
    that stops 10,000 servers queues 10,000 notices). Numbered kinds (reminders) look at their
    earlier ones and go one by one. Returns each notice's id, None when it was already queued."""
    out: list[int | None] = [None] * len(specs)
    where: dict[tuple[int, str, str], int] = {}
    stmt = (
        db.insert(NOTICES)
        .on_conflict_do_nothing(index_elements=["run_id", "kind", "spell_key", "seq"])
        .returning(NOTICES.c.id, NOTICES.c.run_id, NOTICES.c.kind, NOTICES.c.spell_key)
    )
    # in slices: every notice's context (a dict of ~20 entries) is built only for its slice
    for c in range(0, len(specs), _SLICE):
        rows: list[dict[str, Any]] = []
        for i in range(c, min(c + _SLICE, len(specs))):
            spec = specs[i]
            kind = NoticeKind(spec.kind)
            if kind in _NUMBERED:
                out[i] = queue_notice(db, s, spec, now)
                continue
            skey = spell_key(spec.spell)
            if (spec.run_id, kind.value, skey) in where:  # the same notice twice in one batch: once
                continue
            where[(spec.run_id, kind.value, skey)] = i
            rows.append({"run_id": spec.run_id, "kind": kind.value, "spell": spec.spell, "spell_key": skey,
                         "seq": 0, "created_at": now, "channels": _channels(spec.channels),
                         "context": spec.context.to_json(), "failed": False})
        if not rows:
            continue
        deliveries: list[dict[str, Any]] = []
        for r in s.execute(stmt, rows):
            i = where[(int(r.run_id), r.kind, r.spell_key)]
            out[i] = int(r.id)
            deliveries.extend(_deliveries(int(r.id), specs[i].channels, now))
        if deliveries:
            s.execute(DELIVERIES.insert(), deliveries)
    return out


def queue_notice(db: Database, s: Connection, spec: NoticeSpec, now: datetime) -> int | None:
    """One notice (a reminder takes the next number of its spell); None when already queued."""
    kind = NoticeKind(spec.kind)
    skey = spell_key(spec.spell)
    if kind in _NUMBERED:
        earlier = (
            s.execute(
                select(NOTICES.c.created_at).where(
                    NOTICES.c.run_id == spec.run_id,
                    NOTICES.c.kind == kind.value,
                    NOTICES.c.spell_key == skey,
                )
            )
            .scalars()
            .all()
        )
        if any(t >= now for t in earlier):
            return None  # this reminder was already recorded (the same decision, recorded again)
        seq = len(earlier) + 1
    else:
        seq = 0
    nid = s.execute(
        db.insert(NOTICES)
        .values(
            run_id=spec.run_id,
            kind=kind.value,
            spell=spec.spell,
            spell_key=skey,
            seq=seq,
            created_at=now,
            channels=_channels(spec.channels),
            context=spec.context.to_json(),
            failed=False,
        )
        .on_conflict_do_nothing(index_elements=["run_id", "kind", "spell_key", "seq"])
        .returning(NOTICES.c.id)
    ).scalar_one_or_none()
    if nid is None:
        return None
    s.execute(DELIVERIES.insert(), _deliveries(int(nid), spec.channels, now))
    return int(nid)
