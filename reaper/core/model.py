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
    WORKING = "working"  # a program is running: a terminal command, a background process (core.activity)
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
    display_name: str | None = None  # the hub's display_name of a named server (JupyterHub 6), when set
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
        """The batch job id in the spawner state; a wrapper's (wrapspawner) nested ``child_state``
        is followed (the hub adapter already unwraps it; state made elsewhere may not be)."""
        state = self.state
        for _ in range(8):
            if not isinstance(state, dict):
                return None
            job = state.get("job_id")
            if job not in (None, ""):
                return str(job)
            state = state.get("child_state")
        return None

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


class Where(StrEnum):
    """Where a program of the job runs."""

    TERMINAL = "terminal"  # started in terminal N (source: its name)
    KERNEL = "kernel"  # started by kernel K (source: its id), or the kernel itself (``is_kernel``)
    OTHER = "other"  # started some other way (nohup, a new session, the server itself)
    JOB = "job"  # the whole batch job, as the batch system's accounting sees it (source: job id)


@dataclass(frozen=True, slots=True)
class Program:
    """One program the job runs, as the companion or the batch accounting reports it. Only the
    command name, never its arguments (they may hold secrets)."""

    name: str  # "python", "sleep"; a kernel's spec name ("python3"); "job" for the batch job
    where: Where
    source: str | None = None  # terminal name, kernel id, job id
    cpu_seconds: float | None = None  # cumulative user+system CPU; None: not known
    started: datetime | None = None
    pid: int | None = None
    foreground: bool = False  # the command in the foreground of its terminal
    is_kernel: bool = False  # a kernel process itself (its own execution_state below)
    execution_state: str | None = None  # a kernel's, as it reports it

    @property
    def key(self) -> str:
        """What names it across looks (its CPU samples): a pid is reused, a pid with its start is not."""
        if self.where is Where.JOB:
            return f"job:{self.source}"
        if self.is_kernel:
            return f"kernel:{self.source}"
        if self.pid is None:
            return f"{self.where.value}:{self.source}:{self.name}"
        started = self.started.isoformat() if self.started is not None else "?"
        return f"pid:{self.pid}@{started}"

    @property
    def label(self) -> str:
        """In words: "python in terminal 1", "kernel python3 (idle)", "job 42"."""
        if self.where is Where.JOB:
            return f"job {self.source}"
        if self.is_kernel:
            state = f" ({self.execution_state})" if self.execution_state else ""
            return f"kernel {self.name}{state}"
        if self.where is Where.TERMINAL:
            return f"{self.name} in terminal {self.source}"
        if self.where is Where.KERNEL:
            return f"{self.name} started by a kernel"
        return f"{self.name} (pid {self.pid})" if self.pid is not None else self.name


@dataclass(frozen=True, slots=True)
class Work:
    """What the job was seen running at one look, from the companion and the batch accounting.

    ``companion`` and ``batch`` say how each source fared: "ok", "absent" (not installed, no batch
    job), "not asked", or the reason it failed. Only the programs of the sources that answered
    are in ``programs``."""

    programs: tuple[Program, ...] = ()
    companion: str = "not asked"
    batch: str = "not asked"

    @property
    def answered(self) -> bool:
        """Whether any source answered."""
        return "ok" in (self.companion, self.batch)

    @property
    def doubt(self) -> str | None:
        """The sources that failed, in words ("companion: activity: timeout after 5s"), or None. A
        source that is absent (no companion installed, no batch job, no figure for the job) or
        was not asked is no doubt: the others decide, as before the companion existed."""
        failed = [f"{name}: {outcome}" for name, outcome in (("companion", self.companion),
                                                             ("batch accounting", self.batch))
                  if outcome not in ("ok", "absent", "off") and not outcome.startswith(("not asked", "no figure"))]
        return "; ".join(failed) if failed else None

    def sources_ok(self) -> set[Where]:
        out: set[Where] = set()
        if self.companion == "ok":
            out |= {Where.TERMINAL, Where.KERNEL, Where.OTHER}
        if self.batch == "ok":
            out.add(Where.JOB)
        return out


@dataclass(frozen=True, slots=True)
class CpuSample:
    """The per-run memory of one program across looks: its CPU at the last look."""

    key: str  # Program.key
    cpu_seconds: float
    at: datetime  # the look
    since: datetime  # when it started (or was first seen)
    used_at: datetime | None = None  # the last look at which it used CPU (at least probe.working_cpu)


@dataclass(frozen=True, slots=True)
class WorkMemory:
    """What a look at the job's work leaves for the next (recorded with the observation)."""

    samples: tuple[CpuSample, ...] = ()
    working_at: datetime | None = None  # the last look at which the server was working


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
    work: Work | None = None  # what the job runs (None: not looked at: core.activity.classify_work)
    memory: WorkMemory | None = None  # the work look's memory to record (None: leave the recorded one)

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
    samples: tuple[CpuSample, ...] = ()  # the programs' CPU at the last look at the job's work
    working_at: datetime | None = None  # the last look at which the server was working


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
