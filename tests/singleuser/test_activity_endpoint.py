"""The companion on a real jupyter_server: what GET api/reaper/activity reports about terminals, kernels and
the processes of the server's job, that it never counts as activity, and that it needs the server's token."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any

import httpx

from tests.singleuser.conftest import LOOP, SECRET, Server


def _procs(report: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [p for p in report["processes"] if all(p.get(k) == v for k, v in match.items())]


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_the_report_has_the_contracts_shape(server: Server) -> None:
    report = server.activity()
    assert set(report) == {"version", "now", "server", "kernels", "terminals", "processes"}
    assert report["version"] == 1 and report["now"].endswith("Z")
    assert report["server"]["pid"] == server.proc.pid
    assert isinstance(report["server"]["cpu_seconds"], float) and report["server"]["cpu_seconds"] > 0


def test_a_silent_cpu_loop_in_a_terminal_is_reported_with_its_terminal_and_growing_cpu(server: Server) -> None:
    name = server.new_terminal()
    shell = server.terminal(name)["pid"]
    server.type(name, f'python3 -c "{LOOP}" --api-token={SECRET}')  # the websocket is closed again: tab closed
    found = server.wait_for(lambda: [p for p in _procs(server.activity(), started_by="terminal", source=name)
                                     if p["name"].startswith("python")], what="the loop in the report")
    (loop,) = found
    assert loop["pid"] != shell
    assert server.terminal(name)["foreground"].startswith("python")
    first = loop["cpu_seconds"]
    server.wait_for(lambda: _procs(server.activity(), pid=loop["pid"])[0]["cpu_seconds"] > first,
                    what="the loop's cpu_seconds to grow")
    # the shell itself is the terminal, never a process of the list
    assert not _procs(server.activity(), pid=shell)
    _kill(loop["pid"])
    server.wait_for(lambda: server.terminal(name)["foreground"] is None, what="the shell back at its prompt")
    server.delete_terminal(name)


def test_an_idle_shell_has_no_foreground_and_no_process(server: Server) -> None:
    name = server.new_terminal()
    # a shell's start-up (bashrc) may run a few short commands: wait until it sits at its prompt
    server.wait_for(lambda: not _procs(server.activity(), source=name), what="the shell's start-up to end")
    report = server.activity()
    (term,) = [t for t in report["terminals"] if t["name"] == name]
    assert term["foreground"] is None and isinstance(term["pid"], int)
    assert not _procs(report, source=name) and not _procs(report, pid=term["pid"])
    server.delete_terminal(name)


def test_nohup_sleep_is_still_found_after_its_terminal_is_deleted(server: Server) -> None:
    name = server.new_terminal()
    server.type(name, "nohup sleep 100000 >/dev/null 2>&1 &")
    (sleep,) = server.wait_for(lambda: _procs(server.activity(), name="sleep", source=name), what="sleep")
    assert sleep["started_by"] == "terminal"
    assert server.terminal(name)["foreground"] is None  # a background job: the shell is at its prompt
    try:
        server.delete_terminal(name)
        server.wait_for(lambda: name not in [t["name"] for t in server.activity()["terminals"]], what="deletion")
        # the shell is gone and the sleep reparented away from the server's tree; its environment says whose it is
        report = server.activity()
        assert not [p for p in report["processes"] if p["pid"] == sleep["pid"] and p["started_by"] == "terminal"]
        (again,) = _procs(report, pid=sleep["pid"])
        assert again["name"] == "sleep" and again["started_by"] == "other" and again["source"] is None
    finally:
        _kill(sleep["pid"])


def test_a_kernels_new_session_child_is_reported_and_found_after_the_kernel_is_gone(server: Server) -> None:
    kid = server.new_kernel()
    with server.kernel_channel(kid) as ch:
        server.run(ch, "import subprocess, sys\n"
                       f"child = subprocess.Popen([sys.executable, '-c', {LOOP!r}, '--password={SECRET}'],"
                       " start_new_session=True)")
    report = server.wait_for(lambda: (r := server.activity()) and _procs(r, started_by="kernel", source=kid) and r,
                             what="the kernel's child")
    (child,) = _procs(report, started_by="kernel", source=kid)
    assert child["name"].startswith("python")
    (kernel,) = [k for k in report["kernels"] if k["id"] == kid]
    assert kernel["pid"] != child["pid"] and kernel["name"] == "python3" and kernel["started"].endswith("Z")
    try:
        server.delete_kernel(kid)  # the kernel's process group dies; a new session survives, reparented
        server.wait_for(lambda: kid not in [k["id"] for k in server.activity()["kernels"]], what="kernel gone")
        (orphan,) = _procs(server.activity(), pid=child["pid"])
        assert orphan["started_by"] == "other"
    finally:
        _kill(child["pid"])


def test_a_kernel_idle_with_a_busy_background_thread_shows_its_cpu_growing(server: Server) -> None:
    kid = server.new_kernel()
    with server.kernel_channel(kid) as ch:
        server.run(ch, "import threading, time\n"
                       "def spin():\n    while True:\n        sum(range(20000)); time.sleep(0.01)\n"
                       "threading.Thread(target=spin, daemon=True).start()")
        (k1,) = [k for k in server.activity()["kernels"] if k["id"] == kid]

        def grew() -> bool:
            (k2,) = [k for k in server.activity()["kernels"] if k["id"] == kid]
            assert k2["execution_state"] == "idle"
            return k2["cpu_seconds"] > k1["cpu_seconds"] + 0.2

        assert k1["execution_state"] == "idle" and isinstance(k1["pid"], int)
        server.wait_for(grew, what="the idle kernel's cpu_seconds to grow")
        assert not _procs(server.activity(), source=kid)  # a thread is no process
    server.delete_kernel(kid)


def test_command_arguments_never_appear(server: Server) -> None:
    name = server.new_terminal()
    server.type(name, f'python3 -c "{LOOP}" --api-token={SECRET}')
    kid = server.new_kernel()
    with server.kernel_channel(kid) as ch:
        server.run(ch, "import subprocess, sys\n"
                       f"child = subprocess.Popen([sys.executable, '-c', {LOOP!r}, '{SECRET}'], start_new_session=True)")
    def both() -> str | None:
        r = server.get("api/reaper/activity")
        return r.text if len([p for p in r.json()["processes"] if p["name"].startswith("python")]) >= 2 else None

    text = server.wait_for(both, what="both loops in the report")
    assert SECRET not in text and "api-token" not in text and "sum(range" not in text
    for p in server.activity()["processes"]:
        if p["name"].startswith("python"):
            _kill(p["pid"])
    server.delete_kernel(kid)
    server.delete_terminal(name)


def test_probing_never_moves_the_servers_last_activity(server: Server) -> None:
    def last_activity() -> str:
        return server.get("api/status", params={"no_track_activity": "1"}).json()["last_activity"]

    before = last_activity()
    time.sleep(0.05)  # so that activity, if recorded, would carry a later timestamp
    for params in ({}, {"no_track_activity": "1"}, {}):
        server.activity(**params)
    assert server.get("api/reaper/activity-not-there").status_code == 404
    assert last_activity() == before
    # the control: an ordinary API request does move it, so the check above can fail
    assert server.get("api/contents").status_code == 200
    assert last_activity() > before


def test_the_endpoint_needs_the_servers_token(server: Server) -> None:
    url = server.url + "api/reaper/activity"
    assert httpx.get(url).status_code == 403
    assert httpx.get(url, headers={"Authorization": "token not-the-token"}).status_code == 403
    assert server.get("api/reaper/activity").status_code == 200


def test_the_reapers_parser_reads_the_real_report(server: Server) -> None:
    from reaper.hub.probe import Where, parse_activity

    name = server.new_terminal()
    server.type(name, f'python3 -c "{LOOP}"')
    kid = server.new_kernel()
    with server.kernel_channel(kid):
        report = server.wait_for(lambda: (r := server.activity()) and any(
            p["name"].startswith("python") for p in _procs(r, source=name)) and r, what="the loop")
    programs = parse_activity(report)
    (loop,) = [p for p in programs if p.where is Where.TERMINAL and p.source == name]
    assert loop.foreground and loop.name.startswith("python") and loop.cpu_seconds is not None
    assert [p.source for p in programs if p.is_kernel] == [kid]
    for p in _procs(report, source=name):
        _kill(p["pid"])
    server.delete_kernel(kid)
    server.delete_terminal(name)
