"""Plain data shared by the pure core and the adapters.

Nothing here does I/O or reads the clock. Times are timezone-aware UTC datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from ..units import format_duration as format_duration
from ..units import humanize as humanize  # durations for people live in reaper.units; re-exported


class State(StrEnum):
    """What a server is doing, as far as the reaper can tell."""

    COMPUTING = "computing"  # a kernel is busy (the only signal of silent work)
    ATTACHED = "attached"  # a browser is connected (kernel websocket or fresh /api/status)
    DETACHED = "detached"  # window closed: no connection, nothing busy, /api/status stale
    UNREACHABLE = "unreachable"  # the probe failed; hub data only
    PENDING = "pending"  # the hub says spawn/stop is pending: nothing to decide


class Action(StrEnum):
    OK = "ok"
    WARN = "warn"
    REMIND = "remind"
    FINAL = "final-warning"
    STOP = "stop"
    EXEMPT = "exempt"


# Rank used to reason about escalation ("decisions are monotone in time").
ACTION_RANK = {
    Action.EXEMPT: 0,
    Action.OK: 0,
    Action.WARN: 1,
    Action.REMIND: 1,
    Action.FINAL: 2,
    Action.STOP: 3,
}


class NoticeKind(StrEnum):
    WARNING = "warning"  # first "your server is still running"
    REMINDER = "reminder"
    FINAL = "final"  # last notice before the stop
    STOPPED = "stopped"  # "we stopped your server"
    WALLTIME = "walltime"  # "your server will end at its walltime"
    ORPHAN = "orphan"  # "we cancelled a job no server owned"


@dataclass(frozen=True, slots=True)
class RunKey:
    """One server run: notices and deadlines belong to it. A restart is a new run."""

    user: str
    server: str  # "" for the default server
    started: datetime

    @property
    def label(self) -> str:
        return f"{self.user}/{self.server}" if self.server else self.user


@dataclass(frozen=True, slots=True)
class HubServer:
    """One running server as the hub lists it (GET /hub/api/users?state=active)."""

    user: str
    name: str  # "" for the default server
    started: datetime | None
    last_activity: datetime | None  # the hub's own record (coarse)
    ready: bool = True
    pending: str | None = None  # "spawn" / "stop" / None
    url: str = ""  # e.g. /user/alice/ (hub-relative path prefix)
    user_options: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # spawner state (needs admin:server_state)
    groups: tuple[str, ...] = ()
    admin: bool = False
    target: str | None = None  # the server's own address, e.g. http://10.0.0.5:53211 (from /proxy or state)
    display_name: str | None = None  # the hub's display_name of a named server (JupyterHub 5+), when set
    # made once: a sweep keys several maps by it, and one object per server beats one per lookup
    _key: RunKey | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.started is not None:
            object.__setattr__(self, "_key", RunKey(self.user, self.name, self.started))

    @property
    def label(self) -> str:
        return f"{self.user}/{self.name}" if self.name else self.user

    @property
    def job_id(self) -> str | None:
        job = self.state.get("job_id") if isinstance(self.state, dict) else None
        return str(job) if job not in (None, "") else None

    def run_key(self) -> RunKey | None:
        return self._key


@dataclass(frozen=True, slots=True)
class Kernel:
    id: str
    name: str
    execution_state: str  # idle / busy / starting / dead ...
    connections: int
    last_activity: datetime | None


@dataclass(frozen=True, slots=True)
class Probe:
    """What the single-user server said about itself (probed with ?no_track_activity=1)."""

    ok: bool
    error: str | None = None
    status_last_activity: datetime | None = None  # /api/status last_activity
    status_connections: int = 0
    status_kernels: int | None = None  # the kernel count /api/status reports
    kernels: tuple[Kernel, ...] = ()
    terminals: int = 0
    terminals_last_activity: datetime | None = None
    via: str = "direct"  # direct | proxy
    status_started: datetime | None = None  # /api/status started: when the answering server began

    @classmethod
    def failed(cls, error: str, via: str = "direct") -> Probe:
        return cls(ok=False, error=error, via=via)


@dataclass(frozen=True, slots=True)
class Observation:
    """One server at one sweep, classified."""

    server: HubServer
    state: State
    at: datetime
    # Time of the last real activity (a user action, a kernel message); None when unknown.
    last_activity: datetime | None
    # When it became detached (estimate: the later of the kernel and status last_activity).
    detached_since: datetime | None = None
    browser_connected: bool = False  # a kernel websocket is open
    busy_kernels: int = 0
    kernels: int = 0
    terminals: int = 0
    detail: str = ""  # human summary: "2 kernels idle, no browser connected"
    probed: bool = False  # False when skipped because hub activity is fresh
    job_end: datetime | None = None  # batch walltime end, when the batch adapter knows it

    @property
    def job_id(self) -> str | None:
        return self.server.job_id

    @property
    def idle_since(self) -> datetime | None:
        """Start of the current idle spell: notices and deadlines belong to it."""
        if self.state is State.DETACHED and self.detached_since is not None:
            return self.detached_since
        return self.last_activity


@dataclass(frozen=True, slots=True)
class SentNotice:
    """A notice already recorded for this run (from the store)."""

    kind: NoticeKind
    spell: datetime | None  # idle_since of the spell it belongs to; None for run-wide (max_age)
    created_at: datetime
    delivered_at: datetime | None = None  # None while queued
    failed: bool = False  # failed permanently on every channel
    failed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class History:
    """What the store remembers of one server run."""

    first_seen: datetime | None = None
    notices: tuple[SentNotice, ...] = ()
    kept_until: datetime | None = None  # "keep running" chosen by the user
    stop_requested_at: datetime | None = None
    last_state: str | None = None  # as of the last recorded sweep
    last_seen: datetime | None = None
    detached_since: datetime | None = None  # the last recorded start of a detached spell
    last_detail: str | None = None  # the last recorded observation's detail


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str
    rule: str = "defaults"
    notice: NoticeKind | None = None  # the notice this decision sends, if any
    spell: datetime | None = None  # the spell a notice belongs to
    stop_at: datetime | None = None  # projected stop time if nothing changes
    next_at: datetime | None = None  # when the next notice or stop is due
    channels: tuple[str, ...] = ()  # where the notice goes (from the rule)

    @property
    def rank(self) -> int:
        return ACTION_RANK[self.action]
