"""The policy's rules as the pure core sees them: frozen, plain data.

config.py validates the YAML (pydantic) and converts each rule, merged over the defaults, into a
``ResolvedRule``; the policy (policy.py) only ever works with these. Nothing here validates or
reads a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Literal

Computing = Literal["protect", "count"]
Working = Literal["protect", "count"]


@dataclass(frozen=True)
class Thresholds:
    """When to warn and when to stop, counted from the start of the idle spell (None: never)."""

    warn_after: timedelta | None = None
    stop_after: timedelta | None = None


@dataclass(frozen=True)
class Match:
    """A rule matches when every given key matches (keys left as None match anything)."""

    users: tuple[str, ...] | None = None  # names or globs
    groups: tuple[str, ...] | None = None  # any of these groups
    servers: tuple[str, ...] | None = None  # server-name globs; "" is the default server
    # user_options key -> the accepted value, or a tuple of accepted values (globs for strings)
    user_options: Mapping[str, object] | None = None
    min_gpus: int | None = None  # from user_options "gpus" or the batch job
    partitions: tuple[str, ...] | None = None  # from user_options "partition" or the batch job

    def is_catch_all(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


@dataclass(frozen=True)
class ResolvedRule:
    """A rule merged over the defaults: what the pure policy works with."""

    name: str
    match: Match
    detached: Thresholds
    attached: Thresholds
    computing: Computing
    max_age: timedelta | None
    remind_every: timedelta
    min_notice: timedelta
    exempt: bool
    channels: tuple[str, ...]
    working: Working = "protect"  # a program running (State.WORKING): protected, or counted as idle
    # working.protect_idle: also how long a stop waits while a source of the work look fails
    protect_idle: timedelta = timedelta(hours=2)
