""""Keep running": how far a user may postpone a stop (pure: ``now`` is an argument).

A keep moves the server's stop to ``now + requested``, within the limits of the policy
(``web.keep`` in config.yaml): at most ``max_extension`` at a time, at most ``max_per_day`` keeps
per server in 24 hours, and never past the rule's ``max_age`` or the batch job's walltime end
(the keep is shortened to those, or refused when they are less than a minute away).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from ..units import format_duration

# A limit closer than this leaves nothing worth keeping: the keep is refused.
MIN_KEEP = timedelta(minutes=1)


@dataclass(frozen=True)
class KeepPolicy:
    """The limits of "Keep running" (config.py validates ``web.keep`` and builds this)."""

    max_extension: timedelta = timedelta(hours=8)
    max_per_day: int = 3
    # The durations offered on the page; None: 1h, 2h, 4h, 8h below max_extension, and max_extension.
    choices: tuple[timedelta, ...] | None = None

    def offered(self) -> list[timedelta]:
        if self.choices:
            return sorted(set(self.choices))
        hours = [timedelta(hours=h) for h in (1, 2, 4, 8) if timedelta(hours=h) < self.max_extension]
        return [*hours, self.max_extension] if self.max_extension > timedelta(0) else []


class KeepRefused(Exception):
    """A "Keep running" request outside the policy; the message is for the user."""


def keep_until(
    *,
    now: datetime,
    requested: timedelta,
    policy: KeepPolicy,
    keeps_today: int,
    started: datetime | None,
    max_age: timedelta | None,
    job_end: datetime | None,
) -> tuple[datetime, str]:
    """The time a "Keep running" moves the stop to, and a note when a limit shortened it.
    Raises KeepRefused when the policy does not allow it."""
    if requested <= timedelta(0):
        raise KeepRefused("choose how long to keep the server running")
    if requested > policy.max_extension:
        raise KeepRefused(f"at most {format_duration(policy.max_extension)} at a time")
    if keeps_today >= policy.max_per_day:
        raise KeepRefused(
            f"this server was already kept running {keeps_today} times in the last 24 hours "
            f"(at most {policy.max_per_day})"
        )
    until, note = now + requested, ""
    limits: list[tuple[datetime, str]] = []
    if max_age is not None and started is not None:
        limits.append((started + max_age, f"the longest a server may run ({format_duration(max_age)})"))
    if job_end is not None:
        limits.append((job_end, "the job's walltime end"))
    for limit, why in limits:
        if limit <= now + MIN_KEEP:
            raise KeepRefused(f"the server has reached {why}: it cannot be kept longer")
        if limit < until:
            until, note = limit, f"shortened to {why}"
    return until, note
