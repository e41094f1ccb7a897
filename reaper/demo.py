"""jupyterhub-reaper demo: a local hub on 127.0.0.1 with the reaper as its managed service.

Short thresholds so a newcomer sees the whole cycle in a few minutes: start a server, open a
notebook, close the tab, and watch the reaper's log lines go attached -> detached -> warning ->
final notice -> stopped.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
from pathlib import Path

DEMO_CONFIG = """\
# Written by `jupyterhub-reaper demo`: the shipped policy with demo-sized thresholds.
hub:
  name: "Reaper demo hub"
  timezone: "UTC"
sweep_every: 15s
database_url: "sqlite:///reaper.sqlite"
log_level: INFO
probe:
  reprobe_every: 15s
defaults:
  detached: {{warn_after: 1m, stop_after: 4m}}
  attached: {{warn_after: 30m, stop_after: 2h}}
  remind_every: 1m
  min_notice: 1m
  channels: {channels}
notify:
{notify}
"""


def find_hub_config() -> Path:
    here = Path(__file__).resolve().parent.parent / "hub" / "jupyterhub_config.py"
    if here.exists():
        return here
    cwd = Path.cwd() / "hub" / "jupyterhub_config.py"
    if cwd.exists():
        return cwd
    raise SystemExit("cannot find hub/jupyterhub_config.py: run the demo from a checkout of jupyterhub-reaper")


def write_demo_config(state: Path, *, smtp_port: int | None) -> Path:
    if smtp_port:
        channels = "[email, log]"
        notify = (
            "  email:\n"
            "    host: 127.0.0.1\n"
            f"    port: {smtp_port}\n"
            "    security: none\n"
            '    from_addr: "Reaper demo <reaper@localhost>"\n'
            '    address_template: "{username}@localhost"\n'
        )
    else:
        channels, notify = "[log]", "  {}\n"
    path = state / "reaper-demo.yaml"
    path.write_text(DEMO_CONFIG.format(channels=channels, notify=notify))
    return path


def run_demo(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    smtp_port = getattr(args, "smtp_port", None)
    config = write_demo_config(state, smtp_port=smtp_port)
    password = os.environ.get("REAPER_HUB_PASSWORD") or "demo-password"
    env = dict(os.environ)
    env.update(
        REAPER_HUB_STATE=str(state / "hub"),
        REAPER_HUB_PORT=str(args.port),
        REAPER_HUB_PASSWORD=password,
        REAPER_MANAGED="1",
        REAPER_CONFIG=str(config),
        REAPER_HUB_ACTIVITY_INTERVAL="10",
        REAPER_SERVICE_URL=env.get("REAPER_SERVICE_URL", f"http://127.0.0.1:{args.port + 123}"),
    )
    env.setdefault("REAPER_HUB_ADMIN_PASSWORD", secrets.token_hex(16))
    jupyterhub = shutil.which("jupyterhub", path=str(Path(sys.executable).parent)) or "jupyterhub"
    print(
        f"""
  jupyterhub-reaper demo
  ----------------------
  Hub:      http://127.0.0.1:{args.port}/  (log in with any user name, password: {password})
  Reaper:   policy {config}
            (window closed: warning after 1 min, reminders every minute, final notice, stop after 4 min)
  Database: {state / 'reaper.sqlite'}

  Start your server, open a notebook, then close the browser tab and watch the reaper's lines
  below ("reaper.sweep") go attached -> detached -> warning -> final -> stopped.
  In another terminal:  jupyterhub-reaper status -c {config}
  Ctrl-C stops the hub, its servers and the reaper.
""",
        flush=True,
    )
    os.chdir(state)
    os.execve(jupyterhub, [jupyterhub, "-f", str(find_hub_config())], env)
    return 0  # not reached
