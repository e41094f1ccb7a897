"""A single-user server's answers -> :class:`~reaper.core.model.Probe`. Pure: no I/O.

A probe asks ``/api/status``, ``/api/terminals`` and, when the status counts kernels,
``/api/kernels`` (see :meth:`reaper.hub.HubClient.probe`). Each HTTP answer is read by
:func:`read_answer`; the parsed answers become one Probe by :func:`probe_from_answers` (or
:func:`probe_from_status` for a look at the status alone). An answer that is not what jupyter_server
sends makes a failed probe with the reason, never a guess: a probe that cannot be read never makes a
server look idle.

The companion extension's report (``GET api/reaper/activity``) is read by :func:`parse_activity`
into the programs the job runs; a malformed report raises ProbeFailure (the source failed).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from reaper.core.model import Probe, Program, Where

from .models import kernel_from_model, parse_time


class ProbeFailure(Exception):
    """One probe request failed or its answer cannot be read; the message is the short reason
    ("kernels: HTTP 403")."""


def read_answer(what: str, status: int, content: bytes, *, missing_ok: bool = False) -> tuple[bool, Any]:
    """One probe's HTTP answer: (True, parsed JSON, or None for a tolerated 404), or (False, the
    reason) for a 5xx worth one retry. Raises ProbeFailure for an answer not worth retrying."""
    if status == 200:
        try:
            return True, json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ProbeFailure(f"{what}: invalid JSON") from None
    if status == 404 and missing_ok:
        return True, None
    reason = f"{what}: HTTP {status}"
    if status < 500:
        raise ProbeFailure(reason)
    return False, reason


def _count(value: Any) -> int | None:
    """An integer of an answer (a bool is not one)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _started(status: dict[str, Any]) -> datetime | None:
    """/api/status ``started`` (informational: a bad value is ignored, never a failed probe)."""
    try:
        return parse_time(status.get("started"))
    except (ValueError, TypeError):
        return None


def needs_kernels(status: Any) -> bool:
    """Whether /api/kernels must be asked after this /api/status answer: not when the status
    counts no kernel (one request where one suffices), nor when the status is unreadable."""
    return isinstance(status, dict) and _count(status.get("kernels")) != 0


def status_answer(probe: Probe) -> dict[str, Any]:
    """The /api/status answer a status-only probe (:func:`probe_from_status`) was read from: a
    full probe that follows it in the same sweep need not ask the status again."""
    return {
        "kernels": probe.status_kernels,
        "connections": probe.status_connections,
        "last_activity": probe.status_last_activity.isoformat() if probe.status_last_activity else None,
        "started": probe.status_started.isoformat() if probe.status_started else None,
    }


def probe_from_status(status: Any, *, via: str = "direct") -> Probe:
    """``/api/status`` alone: enough to tell whether anything happened since a full probe. The
    kernel count is ``status_kernels`` (None when the answer has none); ``kernels`` stays empty."""
    if not isinstance(status, dict):
        return Probe.failed("status: unexpected answer (not an object)", via=via)
    try:
        last = parse_time(status.get("last_activity"))
    except ValueError:
        return Probe.failed("status: invalid last_activity", via=via)
    return Probe(
        ok=True,
        status_last_activity=last,
        status_connections=_count(status.get("connections", 0)) or 0,
        status_kernels=_count(status.get("kernels")),
        via=via,
        status_started=_started(status),
    )


def probe_from_answers(status: Any, kernels: Any, terminals: Any, *, via: str = "direct") -> Probe:
    """The parsed answers of ``/api/status``, ``/api/kernels`` and ``/api/terminals`` -> Probe.

    ``kernels`` is ``[]`` when it was not asked (the status counts none); ``terminals`` is ``[]``
    when not asked and None when the server has no terminals API (a 404: none can run)."""
    try:
        return _full_probe(status, kernels, terminals, via)
    except ProbeFailure as exc:
        return Probe.failed(str(exc), via=via)


def _full_probe(status: Any, kernels_raw: Any, terminals_raw: Any, via: str) -> Probe:
    if not isinstance(status, dict):
        raise ProbeFailure("status: unexpected answer (not an object)")
    conns = _count(status.get("connections", 0))
    if conns is None:
        raise ProbeFailure("status: connections is not an integer")
    try:
        status_last = parse_time(status.get("last_activity"))
    except ValueError:
        raise ProbeFailure("status: invalid last_activity") from None
    if not isinstance(kernels_raw, list):
        raise ProbeFailure("kernels: unexpected answer (not a list)")
    try:
        kernels = tuple(kernel_from_model(k) for k in kernels_raw)
    except (TypeError, ValueError) as exc:
        raise ProbeFailure(f"kernels: malformed entry ({exc})") from None
    if terminals_raw is None:
        terminals_raw = []
    if not isinstance(terminals_raw, list):
        raise ProbeFailure("terminals: unexpected answer (not a list)")
    try:
        term_times = [parse_time(t.get("last_activity")) for t in terminals_raw if isinstance(t, dict)]
    except ValueError:
        raise ProbeFailure("terminals: invalid last_activity") from None
    known = [t for t in term_times if t is not None]
    counted = _count(status.get("kernels"))
    return Probe(
        ok=True,
        status_last_activity=status_last,
        status_connections=conns,
        status_kernels=counted if counted is not None else len(kernels),
        kernels=kernels,
        terminals=len(terminals_raw),
        terminals_last_activity=max(known) if known else None,
        via=via,
        status_started=_started(status),
    )


# --------------------------------------------------------------------------- the companion's report

_STARTED_BY = {"terminal": Where.TERMINAL, "kernel": Where.KERNEL, "other": Where.OTHER}


def _cpu(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < 0:
        raise ProbeFailure(f"activity: {what}: cpu_seconds is not a number of seconds")
    return float(value)


def _pid(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProbeFailure(f"activity: {what}: pid is not an integer")
    return value


def _text(value: Any, what: str, *, none: bool = False) -> str | None:
    if value is None and none:
        return None
    if not isinstance(value, str):
        raise ProbeFailure(f"activity: {what} is not a string")
    return value


def _when(value: Any, what: str) -> datetime | None:
    try:
        return parse_time(value)
    except (ValueError, TypeError):
        raise ProbeFailure(f"activity: {what}: invalid time") from None


def _entries(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = data.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ProbeFailure(f"activity: {key} is not a list of objects")
    return items


def parse_activity(data: Any) -> tuple[Program, ...]:
    """The companion's report -> the programs of the job: its kernels (with their own CPU), the
    processes it found (where they were started, their CPU), and the terminals' foreground commands
    (a terminal whose foreground command is not among the processes still counts, CPU unknown).
    Raises ProbeFailure on anything malformed: the report is then not used at all."""
    if not isinstance(data, dict):
        raise ProbeFailure("activity: unexpected answer (not an object)")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ProbeFailure(f"activity: unknown version {version!r}")
    programs: list[Program] = []
    for k in _entries(data, "kernels"):
        kid = _text(k.get("id"), "kernel id")
        programs.append(Program(
            name=_text(k.get("name", "kernel"), "kernel name") or "kernel", where=Where.KERNEL, source=kid,
            cpu_seconds=_cpu(k.get("cpu_seconds"), f"kernel {kid}"), started=_when(k.get("started"), "kernel started"),
            pid=_pid(k.get("pid"), f"kernel {kid}"), is_kernel=True,
            execution_state=_text(k.get("execution_state"), "kernel execution_state", none=True)))
    foreground: dict[str, str] = {}
    for t in _entries(data, "terminals"):
        name = _text(t.get("name"), "terminal name")
        fg = _text(t.get("foreground"), f"terminal {name} foreground", none=True)
        if name is not None and fg:
            foreground[name] = fg
    matched: set[str] = set()
    for p in _entries(data, "processes"):
        name = _text(p.get("name"), "process name") or "?"
        where = _STARTED_BY.get(p.get("started_by"))  # type: ignore[arg-type]
        if where is None:
            raise ProbeFailure(f"activity: process {name}: unknown started_by {p.get('started_by')!r}")
        source = p.get("source")
        source = None if source is None else str(source)
        pid = _pid(p.get("pid"), f"process {name}")
        fg = where is Where.TERMINAL and source is not None and foreground.get(source) == name
        if fg:
            matched.add(source)  # type: ignore[arg-type]
        programs.append(Program(name=name, where=where, source=source, cpu_seconds=_cpu(p.get("cpu_seconds"), name),
                                started=_when(p.get("started"), f"process {name} started"), pid=pid, foreground=fg))
    for term, fg in sorted(foreground.items()):
        if term not in matched:
            programs.append(Program(name=fg, where=Where.TERMINAL, source=term, foreground=True))
    return tuple(programs)
