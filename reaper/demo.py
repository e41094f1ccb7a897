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
  attached_within: 30s
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
            '    from_addr: "Reaper demo <reaper@demo.example.org>"\n'
            '    address_template: "{username}@demo.example.org"\n'
        )
    else:
        channels, notify = "[log]", "  {}\n"
    path = state / "reaper-demo.yaml"
    path.write_text(DEMO_CONFIG.format(channels=channels, notify=notify))
    return path


class _PrintingHandler:
    """The demo's mail sink: prints each notice as it arrives, and keeps it under mail/."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        from email import message_from_bytes, policy

        raw = envelope.content  # type: ignore[attr-defined]
        msg = message_from_bytes(raw, policy=policy.default)
        self.count += 1
        path = self.folder / f"{self.count:03d}-{msg.get('X-Reaper-Notice', 'mail')}.eml"
        path.write_bytes(raw)
        body = msg.get_body(preferencelist=("plain",))
        text = body.get_content() if body is not None else ""
        bar = "=" * 78
        print(f"\n{bar}\nMAIL to {', '.join(envelope.rcpt_tos)}: {msg['Subject']}  ({path})\n{bar}\n{text}{bar}\n",
              flush=True)  # type: ignore[attr-defined]
        return "250 OK"


def start_mail_sink(folder: Path, port: int) -> object:
    from aiosmtpd.controller import Controller

    folder.mkdir(parents=True, exist_ok=True)
    controller = Controller(_PrintingHandler(folder), hostname="127.0.0.1", port=port)
    controller.start()
    return controller


def run_demo(args: argparse.Namespace) -> int:
    import signal
    import subprocess

    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    smtp_port = args.smtp_port
    sink = start_mail_sink(state / "mail", smtp_port) if smtp_port else None
    config = write_demo_config(state, smtp_port=smtp_port)
    password = os.environ.get("REAPER_HUB_PASSWORD") or "demo-password"
    env = dict(os.environ)
    env.update(
        REAPER_HUB_STATE=str(state / "hub"),
        REAPER_HUB_PORT=str(args.port),
        REAPER_PROXY_API_PORT=str(args.port + 1),
        REAPER_HUB_API_PORT=str(args.port + 81),
        REAPER_HUB_PASSWORD=password,
        REAPER_MANAGED="1",
        REAPER_CONFIG=str(config),
        REAPER_HUB_ACTIVITY_INTERVAL="10",
        REAPER_SERVICE_URL=env.get("REAPER_SERVICE_URL", f"http://127.0.0.1:{args.port + 123}"),
    )
    env.setdefault("REAPER_HUB_ADMIN_PASSWORD", secrets.token_hex(16))
    jupyterhub = shutil.which("jupyterhub", path=str(Path(sys.executable).parent)) or "jupyterhub"
    mail = f"a local mail sink on 127.0.0.1:{smtp_port}: notices print here and are kept in {state / 'mail'}" \
        if smtp_port else "the log only (--smtp-port 0)"
    print(
        f"""
  jupyterhub-reaper demo
  ----------------------
  Hub:      http://127.0.0.1:{args.port}/  (log in with any user name, password: {password})
  Reaper:   policy {config}
            window closed: warning after 1 min, reminders every minute, final notice, stop after 4 min
  Notices:  {mail}
  Page:     http://127.0.0.1:{args.port}/services/reaper/
  Database: {state / 'reaper.sqlite'}

  Start your server, open a notebook, then close the browser tab and watch the lines of
  "reaper.sweep" below go attached -> detached -> warning -> final -> stopped.
  In another terminal:  jupyterhub-reaper status -c {config}
  Ctrl-C stops the hub, its servers and the reaper.
""",
        flush=True,
    )
    hub = subprocess.Popen([jupyterhub, "-f", str(find_hub_config())], cwd=state, env=env)
    try:
        return hub.wait()
    except KeyboardInterrupt:
        hub.send_signal(signal.SIGINT)
        return hub.wait()
    finally:
        if sink is not None:
            sink.stop()  # type: ignore[attr-defined]
