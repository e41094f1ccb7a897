"""Notice rules: quiet hours and the per-user daily cap. Pure: ``now`` and the counts come in.

Both postpone warnings and reminders only, never a final notice: a stop waits for its final
notice to be delivered (by ``min_notice``), so postponing it would gain nothing and only move the
stop later.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, tzinfo
from typing import Protocol

from .model import Action, Decision, NoticeKind

SOFT = (NoticeKind.WARNING, NoticeKind.REMINDER)  # the notices that may wait


class QuietWindow(Protocol):
    """Local "HH:MM" start and end (reaper.config.QuietHours)."""

    start: str
    end: str


def quiet_hours_end(q: QuietWindow, now: datetime, tz: tzinfo) -> datetime | None:
    """If ``now`` falls in the quiet hours (in ``tz``), when they end; else None."""
    local = now.astimezone(tz)
    sh, sm = map(int, q.start.split(":"))
    eh, em = map(int, q.end.split(":"))
    start = local.replace(hour=sh, minute=sm, second=0, microsecond=0)
    end = local.replace(hour=eh, minute=em, second=0, microsecond=0)
    if start == end:
        return None
    if start < end:  # e.g. 12:00-14:00
        return end if start <= local < end else None
    # over midnight, e.g. 22:00-07:00
    if local >= start:
        return end + timedelta(days=1)
    if local < end:
        return end
    return None


def soft_notice_counts(recent: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Warnings and reminders per user among ``recent`` notices, given as (user, kind) pairs (the
    store's recent_notices rows)."""
    soft = {k.value for k in SOFT}
    counts: dict[str, int] = {}
    for user, kind in recent:
        if kind in soft:
            counts[user] = counts.get(user, 0) + 1
    return counts


def postponed(decision: Decision, why: str) -> Decision:
    """The decision with its notice put off: nothing is sent this sweep, and the reason says why."""
    notice = decision.notice.value if decision.notice else "notice"
    return replace(decision, action=Action.OK, notice=None, channels=(),
                   reason=f"{decision.reason} [{notice} postponed: {why}]")


def limit_notices(
    items: Sequence[tuple[str, Decision]],
    counts: Mapping[str, int],
    *,
    cap: int | None,
    quiet_until: datetime | None,
    tz: tzinfo,
) -> tuple[list[Decision], dict[str, int]]:
    """Apply quiet hours and the daily cap to (user, decision) pairs, in order.

    ``counts`` are the users' warnings and reminders so far (the last 24 h, plus what earlier
    batches of this sweep let through); returns the decisions (postponed ones turned ``ok``) and
    the counts after these. Only warnings and reminders are ever postponed."""
    out: list[Decision] = []
    after = dict(counts)
    for user, d in items:
        if d.notice not in SOFT:
            out.append(d)
        elif quiet_until is not None:
            out.append(postponed(d, f"quiet hours until {quiet_until.astimezone(tz):%H:%M}"))
        elif cap is not None and after.get(user, 0) >= cap:
            out.append(postponed(d, f"{user} already got {cap} notices in 24 h"))
        else:
            if cap is not None:
                after[user] = after.get(user, 0) + 1
            out.append(d)
    return out, after
