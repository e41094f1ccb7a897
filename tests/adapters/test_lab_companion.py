"""The companion's notice handlers (reaper/singleuser/notice.py) in a real jupyter_server process.

Real part started: a jupyter_server 2 (from the test venv) on 127.0.0.1 with only the notice extension
enabled (``--ServerApp.jpserver_extensions``), reached with its token. What it proves: setting, reading
and clearing a notice never moves the server's activity (``/api/status`` last_activity, which JupyterHub's
activity reports read), with or without ``?no_track_activity=1``; the keep does, and is remembered until
the reaper's DELETE reads it; bad notices are refused with 400; outside a hub "Stop now" says why not.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from reaper.singleuser.notice import may_delete, parse_notice
from tests.harness.hub import free_ports

NOTICE = {"id": 7, "kind": "warning", "stop_at": "2026-12-01T17:25:00Z", "walltime_end": None,
          "reason": "window closed 3h ago", "hub": "Test Hub", "server": "ada"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    root = tmp_path_factory.mktemp("jupyter")
    port = free_ports(1)[0]
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
    env.update(JUPYTER_CONFIG_DIR=str(root / "config"), JUPYTER_DATA_DIR=str(root / "data"),
               JUPYTER_RUNTIME_DIR=str(root / "runtime"), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    log = open(root / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--ServerApp.jpserver_extensions={'reaper.singleuser.notice': True}", "--allow-root"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/"
    headers = {"Authorization": f"token {token}"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "api/status", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()
            time.sleep(0.2)
        yield base, headers
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def last_activity(base: str, headers: dict[str, str]) -> datetime:
    return datetime.fromisoformat(httpx.get(base + "api/status", headers=headers).json()["last_activity"])


def settle(base: str, headers: dict[str, str]) -> datetime:
    """The activity after a pause, so that a later request would give a later time."""
    before = last_activity(base, headers)
    time.sleep(0.05)
    return before


def test_setting_reading_and_clearing_a_notice_never_counts_as_activity(server):
    base, headers = server
    before = settle(base, headers)
    for query in ("", "?no_track_activity=1"):
        r = httpx.put(base + "api/reaper/notice" + query, headers=headers, json=NOTICE)
        assert r.status_code == 200, r.text
        got = httpx.get(base + "api/reaper/notice" + query, headers=headers).json()
        assert got["notice"]["id"] == "7" and got["notice"]["stop_at"] == "2026-12-01T17:25:00Z"
        assert got["notice"]["walltime_end"] is None and got["kept_at"] is None
        cleared = httpx.delete(base + "api/reaper/notice" + query, headers=headers).json()
        assert cleared["cleared"]["id"] == "7" and cleared["kept_at"] is None
        assert httpx.get(base + "api/reaper/notice", headers=headers).json()["notice"] is None
        httpx.get(base + "api/reaper/stop" + query, headers=headers)
    assert last_activity(base, headers) == before


def test_keep_counts_as_activity_and_the_reaper_reads_kept_at_when_it_clears(server):
    base, headers = server
    assert httpx.put(base + "api/reaper/notice", headers=headers, json=NOTICE).status_code == 200
    before = settle(base, headers)
    kept = httpx.post(base + "api/reaper/keep", headers=headers)
    assert kept.status_code == 200, kept.text
    after = last_activity(base, headers)
    assert after > before
    view = httpx.get(base + "api/reaper/notice", headers=headers).json()
    assert view["notice"] is None  # dismissed in Lab
    assert view["kept_notice"] == "7" and datetime.fromisoformat(view["kept_at"]) >= before
    cleared = httpx.delete(base + "api/reaper/notice", headers=headers).json()
    assert cleared["kept_at"] == view["kept_at"] and cleared["kept_notice"] == "7"
    assert httpx.get(base + "api/reaper/notice", headers=headers).json()["kept_at"] is None


@pytest.mark.parametrize("bad", [
    {**NOTICE, "kind": "stopped"}, {**NOTICE, "stop_at": "tomorrow"}, {**NOTICE, "stop_at": "2026-12-01T17:25:00"},
    {**NOTICE, "id": ""}, {**NOTICE, "reason": 5}, [NOTICE],
])
def test_a_malformed_notice_is_refused_and_the_pending_one_stays(server, bad):
    base, headers = server
    assert httpx.put(base + "api/reaper/notice", headers=headers, json=NOTICE).status_code == 200
    r = httpx.put(base + "api/reaper/notice", headers=headers, json=bad)
    assert r.status_code == 400, r.text
    assert httpx.get(base + "api/reaper/notice", headers=headers).json()["notice"]["id"] == "7"
    httpx.delete(base + "api/reaper/notice", headers=headers)


def test_no_token_no_notice(server):
    base, _ = server
    assert httpx.get(base + "api/reaper/notice").status_code == 403
    assert httpx.put(base + "api/reaper/notice", json=NOTICE).status_code == 403


def test_stop_now_outside_a_hub_says_why_it_cannot(server):
    base, headers = server
    r = httpx.post(base + "api/reaper/stop", headers=headers)
    assert r.status_code == 403 and "JupyterHub" in r.json()["message"]


def test_walltime_notice_needs_no_stop_time_and_long_texts_are_cut():
    n = parse_notice({"id": "w1", "kind": "walltime", "stop_at": None, "walltime_end": "2026-12-01T18:00:00+01:00",
                      "reason": "x" * 2000})
    assert n["walltime_end"] == "2026-12-01T17:00:00Z" and n["stop_at"] is None and len(n["reason"]) == 500
    with pytest.raises(ValueError):
        parse_notice({**NOTICE, "stop_at": None})


def test_which_scopes_let_a_server_stop_itself():
    assert may_delete(["delete:servers!server=ada/"], "ada", "")
    assert may_delete(["delete:servers!server=ada/gpu"], "ada", "gpu")
    assert may_delete(["servers!user=ada"], "ada", "gpu")
    assert not may_delete(["delete:servers!server=ada/gpu"], "ada", "")
    assert not may_delete(["delete:servers!user=bob", "access:servers!server=ada/", "users:activity!user=ada"],
                          "ada", "")
    assert not may_delete(None, "ada", "")
