"""The batch-system interface the reaper uses, and the command runner the adapters share.

An adapter lists the hub's jobs, cancels one, and tells the CPU time jobs have used so far (their
accounting). Its one hard rule: **doubt is never "gone"**, and never "idle".
`job()` returns None only when the batch system positively says the job does not exist or has
finished; a command that fails, times out or prints something unexpected raises `BatchError`
(state unknown), so that no caller ever forgets a job that may still hold CPUs and GPUs.
`cpu_usage()` likewise raises `BatchError` when its command fails or answers garbage: an empty
answer that would read as "no CPU used" is never made up.

Commands run as asyncio subprocesses (the event loop never blocks) with a timeout; on timeout
the child's whole process group is killed. Every command can be given an explicit path and a
prefix template, e.g. `sudo -n -u {username}` or `runuser -u {username} --` (empty by default:
the reaper's own user runs them, which for cancelling other users' jobs must be root or a
Slurm operator/admin).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol, runtime_checkable

__all__ = [
    "BatchError",
    "BatchSystem",
    "CommandResult",
    "CommandRunner",
    "Job",
    "JobState",
    "parse_cpu_seconds",
]


class JobState(StrEnum):
    """Normalised job states (Slurm's long names; PBS/Torque letters map onto them)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETING = "COMPLETING"  # still holds (part of) its resources
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    OTHER = "OTHER"  # a state we do not know: treated as "still there"

    @property
    def finished(self) -> bool:
        return self in (JobState.COMPLETED, JobState.CANCELLED, JobState.FAILED, JobState.TIMEOUT)

    @property
    def holds_resources(self) -> bool:
        return not self.finished


@dataclass(frozen=True)
class Job:
    """One batch job as the batch system lists it. Times are timezone-aware (UTC)."""

    id: str
    user: str
    name: str
    state: JobState
    partition: str | None = None  # partition (Slurm) / queue (PBS)
    node: str | None = None  # first (batch) node, None while pending
    gpus: int = 0
    cpus: int = 0
    mem_mb: int | None = None
    start: datetime | None = None  # actual start (None while pending)
    end: datetime | None = None  # walltime end: when the batch system will end it (None: unlimited)
    raw_state: str = ""  # the batch system's own word for the state

    @property
    def finished(self) -> bool:
        return self.state.finished


class BatchError(Exception):
    """A batch command failed, timed out or answered something we cannot read: state UNKNOWN.

    Never take it to mean "the job is gone".
    """

    def __init__(
        self, message: str, *, command: Sequence[str] = (), stderr: str = "", returncode: int | None = None
    ):
        super().__init__(message)
        self.command = tuple(command)
        self.stderr = stderr
        self.returncode = returncode


@runtime_checkable
class BatchSystem(Protocol):
    """What the reaper needs from a batch system."""

    async def jobs(self, *, name: str | None = None, user: str | None = None) -> list[Job]:
        """Jobs that still exist (pending, running, completing...), optionally filtered."""
        ...

    async def job(self, job_id: str) -> Job | None:
        """The job, or None only when the batch system positively says it is gone/finished."""
        ...

    async def cancel(self, job_id: str, *, user: str | None = None) -> None:
        """Cancel the job (as `user` through the prefix, when given). Gone already is success."""
        ...

    async def cpu_usage(self, job_ids: Sequence[str]) -> dict[str, float]:
        """CPU seconds (user + system, every step/task of the job) each job has used so far, by the
        ids asked, from ONE command for all of them. A job the batch system does not account for
        (finished, pending, unknown, or whose figure could not be read whole) is absent: absence
        means "unknown", never "idle". A failing, timed-out or unreadable command raises BatchError.
        Figures are cumulative and coarse (Slurm: whole seconds, sampled): compare across looks."""
        ...


_CPU_TIME = re.compile(
    r"(?:(?:(?P<d>\d+)-)?(?P<h>\d+):)?(?P<m>\d+):(?P<s>\d+(?:\.\d*)?)|(?P<secs>\d+(?:\.\d*)?)"
)


def parse_cpu_seconds(value: str) -> float | None:
    """A CPU time as batch systems print it -> seconds; None when it is not one.

    `[D-]HH:MM:SS[.fff]` (Slurm's sstat, PBS/Torque's resources_used.cput), `MM:SS.fff` (Slurm
    under an hour), or plain seconds (`123`, Torque's XML on some versions). Days need hours."""
    m = _CPU_TIME.fullmatch(value.strip())
    if m is None:
        return None
    if m.group("secs") is not None:
        return float(m.group("secs"))
    d, h = int(m.group("d") or 0), int(m.group("h") or 0)
    return ((d * 24 + h) * 60 + int(m.group("m"))) * 60 + float(m.group("s"))


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandRunner:
    """Runs batch commands without blocking the loop, with a timeout and an optional prefix.

    prefix: a template such as "sudo -n -u {username}" or "runuser -u {username} --"; it is
    used only when a username is given (commands run as the service's own user otherwise).
    env: extra environment variables (e.g. SLURM_CONF) on top of the service's environment.
    """

    def __init__(
        self,
        *,
        timeout: float = 30.0,
        prefix: str = "",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.timeout = timeout
        self.prefix = prefix
        self.env = dict(env or {})

    def argv(self, command: Sequence[str], username: str | None = None) -> list[str]:
        if username is not None and self.prefix.strip():
            return [*shlex.split(self.prefix.format(username=username)), *command]
        return list(command)

    async def run(
        self,
        command: Sequence[str],
        *,
        username: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> CommandResult:
        argv = self.argv(command, username)
        limit = self.timeout if timeout is None else timeout
        env = {**os.environ, **self.env}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group: a timeout kills it and its children
            )
        except OSError as e:
            raise BatchError(f"cannot run {argv[0]}: {e}", command=argv) from e
        try:
            out, err = await asyncio.wait_for(proc.communicate(), limit)
        except (TimeoutError, asyncio.CancelledError) as e:
            await _kill(proc)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise BatchError(
                f"{shlex.join(argv)} timed out after {limit:g} s (killed)", command=argv
            ) from None
        return CommandResult(
            tuple(argv),
            proc.returncode if proc.returncode is not None else -1,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
        )


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(proc.wait(), 5)
