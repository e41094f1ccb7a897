"""What this server's job runs, read with psutil: one pass over the process table, bounded work.

The job's processes are found two ways, because reparented ones leave the server's tree:
- the server's descendants (kernels, terminal shells and everything under them);
- processes of the same user whose environment carries this server's identity: the marker the
  extension puts in the server's environment at load (inherited by everything it starts, also by
  `nohup ... &` once its terminal is closed and by `Popen(..., start_new_session=True)` once its
  parent is gone), the hub's identity of this server (JUPYTERHUB_SERVICE_PREFIX + JUPYTERHUB_API_URL)
  and, in a Slurm job, SLURM_JOB_ID (with SLURM_CLUSTER_NAME and SLURM_CONF where set) or the job's
  cgroup (job_<id>).
Left out: the server itself and its ancestors (the batch script, batchspawner's wrapper), kernels and
terminal shells (reported on their own), zombies and slurmstepd. Only the command NAME is read
(psutil name()): never the arguments, which may hold secrets. A process that vanishes while it is read,
or whose fields psutil cannot give, is skipped or reported with what is known.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psutil

ATTRS = ["pid", "ppid", "name", "uids", "create_time", "cpu_times", "status"]
MARKER = "JUPYTERHUB_REAPER_SERVER"  # the same name as reaper.singleuser.MARKER (no import cycle)
HUB_IDENTITY = ("JUPYTERHUB_SERVICE_PREFIX", "JUPYTERHUB_API_URL")
# a job id is unique within one cluster (one slurm.conf): with several clusters on one machine (test
# machines) the id alone would match another cluster's job
SLURM_IDENTITY = ("SLURM_JOB_ID", "SLURM_CLUSTER_NAME", "SLURM_CONF")
NEVER_REPORTED = frozenset({"slurmstepd"})


@dataclass(frozen=True)
class Row:
    """One process as psutil gave it; any field psutil could not give is None."""

    pid: int
    ppid: int | None
    name: str | None
    uid: int | None
    started: float | None
    cpu: float | None
    zombie: bool


@dataclass(frozen=True)
class Identity:
    """How a process shows it belongs to this server: any one group of (variable, value) pairs all
    present in its environment, or (in a Slurm job) the job's cgroup."""

    groups: tuple[tuple[tuple[str, str], ...], ...]
    slurm_job: str | None = None


def identity_from(env: Mapping[str, str]) -> Identity:
    groups: list[tuple[tuple[str, str], ...]] = []
    if env.get(MARKER):
        groups.append(((MARKER, env[MARKER]),))
    if all(env.get(k) for k in HUB_IDENTITY):
        groups.append(tuple((k, env[k]) for k in HUB_IDENTITY))
    job = env.get("SLURM_JOB_ID") or None
    if job:
        groups.append(tuple((k, env[k]) for k in SLURM_IDENTITY if env.get(k)))
    return Identity(tuple(groups), job)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def command_name(name: Any) -> str | None:
    """psutil's name(), cut at the first blank: it is the kernel's 15-character comm or, when that is cut
    short, the base name of argv[0], which a program may have rewritten (setproctitle) to hold its
    arguments."""
    if not isinstance(name, str):
        return None
    words = name.split()
    return words[0][:64] if words else None


def row_of(info: Mapping[str, Any]) -> Row | None:
    """A Row from psutil's `info` dict, tolerant of any field missing, None or of the wrong type."""
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
        return None
    ppid = info.get("ppid")
    name = info.get("name")
    uids = info.get("uids")
    uid = getattr(uids, "real", None)
    times = info.get("cpu_times")
    user, system = _num(getattr(times, "user", None)), _num(getattr(times, "system", None))
    return Row(
        pid=pid,
        ppid=ppid if isinstance(ppid, int) and not isinstance(ppid, bool) else None,
        name=command_name(name),
        uid=uid if isinstance(uid, int) else None,
        started=_num(info.get("create_time")),
        cpu=user + system if user is not None and system is not None else None,
        zombie=info.get("status") == psutil.STATUS_ZOMBIE,
    )


def read_table(processes: Iterable[Any] | None = None) -> dict[int, Row]:
    """pid -> Row for every process psutil lists (or `processes`: objects with an `info` dict)."""
    table: dict[int, Row] = {}
    for p in psutil.process_iter(ATTRS) if processes is None else processes:
        try:
            info = p.info
            row = row_of(info) if isinstance(info, Mapping) else None
        except (psutil.Error, OSError, AttributeError):
            continue
        if row is not None:
            table[row.pid] = row
    return table


def read_environ(pid: int) -> Mapping[str, str] | None:
    """The process's environment (readable for the same user): /proc/PID/environ where there is one (a
    twentieth of psutil's cost), else psutil. None when it cannot be read (gone, another user's)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None  # a Linux process that is gone
        try:
            return psutil.Process(pid).environ()
        except (psutil.Error, OSError):
            return None
    except OSError:
        return None
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return env


def read_cgroup(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _children(table: Mapping[int, Row]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for row in table.values():
        if row.ppid is not None and row.ppid != row.pid:
            out.setdefault(row.ppid, []).append(row.pid)
    return out


def descendants(root: int, children: Mapping[int, list[int]]) -> set[int]:
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def ancestors(pid: int, table: Mapping[int, Row]) -> set[int]:
    found: set[int] = set()
    row = table.get(pid)
    while row is not None and row.ppid is not None and row.ppid not in found and row.ppid != row.pid:
        found.add(row.ppid)
        row = table.get(row.ppid)
    return found


def _carries(env: Mapping[str, str] | None, identity: Identity) -> bool:
    if not env:
        return False
    return any(all(env.get(k) == v for k, v in group) for group in identity.groups)


def _in_job_cgroup(text: str | None, job: str) -> bool:
    if not text:
        return False
    return any(part == f"job_{job}" for line in text.splitlines() for part in line.split(":")[-1].split("/"))


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def started_by(
    pid: int, table: Mapping[int, Row], kernels: Mapping[int, str], terminals: Mapping[int, str]
) -> tuple[str, str | None]:
    """The nearest kernel or terminal shell above `pid`: ("kernel", id), ("terminal", name) or ("other", None)."""
    seen: set[int] = set()
    row = table.get(pid)
    while row is not None and row.ppid is not None and row.ppid not in seen:
        parent = row.ppid
        seen.add(parent)
        if parent in terminals:
            return "terminal", terminals[parent]
        if parent in kernels:
            return "kernel", kernels[parent]
        row = table.get(parent)
    return "other", None


def job_processes(
    server_pid: int,
    table: Mapping[int, Row],
    kernels: Mapping[int, str],
    terminals: Mapping[int, str],
    identity: Identity,
    *,
    uid: int,
    environ: Callable[[int], Mapping[str, str] | None] = read_environ,
    cgroup: Callable[[int], str | None] = read_cgroup,
) -> list[dict[str, Any]]:
    """The `processes` of the report: every process of this server's job that is not the server, one of
    its ancestors, a kernel or a terminal shell. `kernels`: pid -> kernel id; `terminals`: shell pid -> name."""
    children = _children(table)
    below = descendants(server_pid, children)
    skip = {server_pid, *ancestors(server_pid, table), *kernels, *terminals}
    members = set(below)
    for pid, row in table.items():
        if pid in below or pid in skip or row.uid != uid or row.zombie:
            continue
        if _carries(environ(pid), identity) or (
            identity.slurm_job and _in_job_cgroup(cgroup(pid), identity.slurm_job)
        ):
            members.add(pid)
    out = []
    for pid in sorted(members - skip):
        row = table[pid]
        if row.zombie or row.name in NEVER_REPORTED:
            continue
        kind, source = started_by(pid, table, kernels, terminals)
        out.append(
            {
                "pid": pid,
                "name": row.name or "?",
                "started_by": kind,
                "source": source,
                "cpu_seconds": round(row.cpu or 0.0, 3),
                "started": iso(row.started),
            }
        )
    return out


def foreground(shell_pid: int | None, fd: int | None, table: Mapping[int, Row]) -> str | None:
    """The command name of the terminal's foreground process group, None when that is the shell (at its
    prompt) or the terminal is gone. From the pty (tcgetpgrp on its fd); without it, the shell's newest child."""
    if shell_pid is None:
        return None
    below = descendants(shell_pid, _children(table))
    pgid = None
    if fd is not None:
        try:
            pgid = os.tcgetpgrp(fd)
        except OSError:
            pgid = None
    if pgid is not None:
        if pgid == shell_pid:
            return None
        leader = table.get(pgid)
        if leader is not None and leader.name and not leader.zombie:
            return leader.name
        for pid in sorted(below):
            try:
                if os.getpgid(pid) == pgid and table[pid].name:
                    return table[pid].name
            except OSError:
                continue
        return None
    kids = [table[p] for p in below if table[p].ppid == shell_pid and not table[p].zombie and table[p].name]
    if not kids:
        return None
    return max(kids, key=lambda r: r.started or 0.0).name
