"""The reaper as the hub runs it: a managed service started by a real JupyterHub.

Real parts started: JupyterHub with the reaper as its managed service (`jupyterhub-reaper run`),
configurable-http-proxy, single-user servers; the reaper's SQLite store.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
sweep_every: 1s
database_url: "sqlite:///{db}"
hub: {{timezone: UTC}}
probe: {{skip_fresh: false, attached_within: 3s}}
safety: {{max_stops_per_sweep: 5, max_stop_fraction: 1.0}}
defaults:
  detached: {{warn_after: 3s, stop_after: 9s}}
  remind_every: 2s
  min_notice: 2s
  channels: [log]
"""


def write_config(tmp_path: Path) -> tuple[Path, Path]:
    db = tmp_path / "reaper.sqlite"
    cfg = tmp_path / "reaper.yaml"
    cfg.write_text(CONFIG.format(db=db))
    return cfg, db


def test_managed_reaper_stops_a_window_closed_server_and_records_why(hub_factory, tmp_path):
    cfg, db = write_config(tmp_path)
    hub = hub_factory(managed=True, reaper_config=cfg)
    user = "managed-detach"
    hub.create_user(user)
    hub.start_server(user)  # no browser ever connects: detached after attached_within
    hub.wait_for(lambda: hub.server_model(user) is None, timeout=90, what="the managed reaper stops the server")

    def stopped_recorded() -> bool:  # the reaper records the stop once the hub's DELETE has answered
        with sqlite3.connect(db) as con:
            return con.execute("select count(*) from reaper_notices where kind = 'stopped'").fetchone()[0] > 0

    hub.wait_for(stopped_recorded, timeout=30, what="the reaper records the stop and queues its notice")
    log = hub.log_tail(2000)
    assert "reaper started" in log
    assert f"{user} (default): detached" in log
    with sqlite3.connect(db) as con:
        kinds = [k for (k,) in con.execute("select kind from reaper_notices")]
        actions = [(k, ok) for (k, ok) in con.execute("select kind, ok from reaper_actions")]
    assert "warning" in kinds and "final" in kinds and "stopped" in kinds
    assert ("stop", 1) in actions


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_service_exits_promptly_on_sigint_and_sigterm(real_hub, tmp_path, sig):
    cfg, _ = write_config(tmp_path)
    env = dict(os.environ)
    env.update(JUPYTERHUB_API_URL=real_hub.api_url, JUPYTERHUB_API_TOKEN=real_hub.service_token)
    proc = subprocess.Popen(
        [sys.executable, "-m", "reaper.cli", "run", "--config", str(cfg)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "sweep done" in line or not line:
                break
        assert any("sweep done" in x for x in lines), "".join(lines)
        t0 = time.monotonic()
        proc.send_signal(sig)
        rc = proc.wait(timeout=10)
        took = time.monotonic() - t0
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, out
    assert "reaper stopped" in out
    # wait(timeout=10) above is the bound: the hub waits for its services on shutdown
    # (jupyterhub-idle-culler, which ignores SIGINT, makes it wait ~30 s).
    print(f"exited {took:.2f}s after {sig.name}")
