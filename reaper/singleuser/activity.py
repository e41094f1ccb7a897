"""GET <base_url>api/reaper/activity: what this server's job is running, for the reaper's probe.

    {"version": 1, "now": ISO, "server": {"pid", "cpu_seconds"},
     "kernels": [{"id", "name", "pid", "execution_state", "cpu_seconds", "started"}],
     "terminals": [{"name", "pid", "foreground"}],
     "processes": [{"pid", "name", "started_by", "source", "cpu_seconds", "started"}]}

cpu_seconds: user + system CPU time of that one process (all its threads, not its children) so far.
The request never counts as activity: `_track_activity = False` keeps jupyter_server's
`api_last_activity` (which /api/status and JupyterHub's activity reports read) where it was, with or
without ?no_track_activity=1. Authenticated and authorized as every jupyter_server API handler (under
JupyterHub the hub's identity provider requires access to this server).
The scan runs in a thread: the event loop is never blocked by it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web
from tornado.ioloop import IOLoop

from reaper.singleuser import processes as ps

VERSION = 1
PATH = "api/reaper/activity"


def kernel_pids(kernel_manager: Any) -> list[dict[str, Any]]:
    """id, name, pid (None when its provisioner has none, e.g. a remote kernel), execution_state."""
    out = []
    if kernel_manager is None:
        return out
    for kid in list(kernel_manager.list_kernel_ids()):
        try:
            kernel = kernel_manager.get_kernel(kid)
        except KeyError:  # shut down meanwhile
            continue
        pid = getattr(getattr(kernel, "provisioner", None), "pid", None)
        out.append(
            {
                "id": str(kid),
                "name": str(getattr(kernel, "kernel_name", "") or ""),
                "pid": pid if isinstance(pid, int) else None,
                "execution_state": str(getattr(kernel, "execution_state", None) or "unknown"),
            }
        )
    return out


def terminal_ptys(terminal_manager: Any) -> list[tuple[str, int | None, int | None]]:
    """(name, shell pid, pty fd) of every terminal of the server's terminal_manager (terminado)."""
    out: list[tuple[str, int | None, int | None]] = []
    terminals = getattr(terminal_manager, "terminals", None)
    if not isinstance(terminals, Mapping):
        return out
    for name, term in list(terminals.items()):
        pty = getattr(term, "ptyproc", None)
        pid, fd = getattr(pty, "pid", None), getattr(pty, "fd", None)
        out.append((str(name), pid if isinstance(pid, int) else None, fd if isinstance(fd, int) else None))
    return out


def build_report(
    server_pid: int,
    kernels: list[dict[str, Any]],
    terminals: list[tuple[str, int | None, int | None]],
    identity: ps.Identity,
    *,
    now: datetime,
    table: Mapping[int, ps.Row] | None = None,
    uid: int | None = None,
    **scan: Any,
) -> dict[str, Any]:
    """The whole report from one pass over the process table (`table`, read now when not given)."""
    table = ps.read_table() if table is None else table

    def cpu(pid: int | None) -> float:
        row = table.get(pid) if pid is not None else None
        return round(row.cpu, 3) if row is not None and row.cpu is not None else 0.0

    def started(pid: int | None) -> str | None:
        row = table.get(pid) if pid is not None else None
        return ps.iso(row.started) if row is not None else None

    by_kernel = {k["pid"]: k["id"] for k in kernels if k["pid"] is not None}
    by_shell = {pid: name for name, pid, _fd in terminals if pid is not None}
    return {
        "version": VERSION,
        "now": now.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "server": {"pid": server_pid, "cpu_seconds": cpu(server_pid)},
        "kernels": [{**k, "cpu_seconds": cpu(k["pid"]), "started": started(k["pid"])} for k in kernels],
        "terminals": [
            {"name": name, "pid": pid, "foreground": ps.foreground(pid, fd, table)} for name, pid, fd in terminals
        ],
        "processes": ps.job_processes(
            server_pid, table, by_kernel, by_shell, identity, uid=os.getuid() if uid is None else uid, **scan
        ),
    }


class ActivityHandler(APIHandler):
    # never activity: APIHandler.finish() records api_last_activity only when this is True
    _track_activity = False
    auth_resource = "reaper"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        kernels = kernel_pids(self.settings.get("kernel_manager"))
        terminals = terminal_ptys(self.settings.get("terminal_manager"))
        identity = ps.identity_from(os.environ)
        report = await IOLoop.current().run_in_executor(
            None, lambda: build_report(os.getpid(), kernels, terminals, identity, now=datetime.now(UTC))
        )
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(report))


def handlers() -> list[tuple[str, type[web.RequestHandler]]]:
    return [(PATH, ActivityHandler)]
