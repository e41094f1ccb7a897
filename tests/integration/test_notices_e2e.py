"""Notices end to end: a real hub, real kernels, a real SMTP server (aiosmtpd on loopback), the
reaper's SQLite store and outbox; and the outbox against an SMTP server that is down for a while.

Real parts started: JupyterHub + configurable-http-proxy + single-user servers (session hub),
aiosmtpd.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest

from reaper.config import parse_settings
from reaper.core.model import Action, Decision, HubServer, NoticeKind, Observation, State
from reaper.hub import HubClient, ProbeOptions
from reaper.service import make_outbox
from reaper.store import Store
from reaper.sweep import Sweeper
from tests.adapters.smtp_sink import SmtpSink

pytestmark = pytest.mark.integration

POLICY = """
sweep_every: 1s
hub: {{timezone: America/Montreal, name: "Test Hub", public_url: "{public}"}}
probe: {{skip_fresh: false, attached_within: 2s}}
safety: {{max_stops_per_sweep: 5, max_stop_fraction: 1.0}}
defaults:
  detached: {{warn_after: 4s, stop_after: 22s}}
  remind_every: 7s
  min_notice: 5s
  channels: [email]
notify:
  admin_contact: "help@example.org"
  admin_cc: ["hpc-admins@example.org"]
  retry_base: 1s
  email:
    host: 127.0.0.1
    port: {port}
    security: none
    from_addr: "Test Hub <hub@example.org>"
    address_template: "{{username}}@example.org"
"""


def kind_of(msg: EmailMessage) -> str:
    return str(msg["X-Reaper-Notice"])


def text_part(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain",))
    assert part is not None
    return part.get_content()


def html_part(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("html",))
    assert part is not None
    return part.get_content()


async def test_detached_server_gets_warning_reminder_final_stop_stopped_once_each_across_a_restart(
    real_hub, tmp_path: Path
):
    sink = SmtpSink().start()
    user = "mail-e2e"
    real_hub.create_user(user)
    real_hub.start_server(user)
    settings = parse_settings(POLICY.format(port=sink.port, public=real_hub.base_url), env={})
    db = f"sqlite:///{tmp_path / 'reaper.sqlite'}"
    client = HubClient(real_hub.api_url, real_hub.service_token, probes=ProbeOptions(public_url=real_hub.base_url))

    def reaper():
        store = Store.open(db)
        return store, Sweeper(settings, client, store, notifier=make_outbox(settings, store))

    store, sweeper = reaper()
    restarted = False
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and real_hub.server_model(user) is not None:
            res = await sweeper.run_once()
            assert res.ok, res.error
            kinds = [kind_of(m.message) for m in sink.messages]
            if "reminder" in kinds and not restarted:
                store.close()  # the reaper restarts in the middle of the cycle
                store, sweeper = reaper()
                restarted = True
            await asyncio.sleep(1)
        assert real_hub.server_model(user) is None, "the server was not stopped"
        # the stopped notice is delivered by the sweep that stopped it, or the next drain
        await sweeper.notifier.drain(datetime.now(UTC) + timedelta(seconds=5))
    finally:
        store.close()
        await client.aclose()
        sink.stop()

    assert restarted
    msgs = [m for m in sink.messages if f"{user}@example.org" in m.rcpt_tos]
    assert [kind_of(m.message) for m in msgs] == ["warning", "reminder", "final", "stopped"]

    warning = msgs[0].message
    assert warning["To"] == f"{user}@example.org"
    assert "Test Hub" in str(warning["From"]) and warning["List-Id"] and warning["Auto-Submitted"]
    body, html = text_part(warning), html_part(warning)
    for part in (body, html):
        assert f"{real_hub.base_url}/hub/home" in part  # how to stop it now
        assert f"{real_hub.base_url}/user/{user}/" in part  # how to keep it: open it again
    assert "EST" in body or "EDT" in body  # times in the hub's time zone

    final = msgs[2].message
    assert "stop" in str(final["Subject"]).lower()
    stopped = msgs[3]
    assert "hpc-admins@example.org" in stopped.rcpt_tos  # admin copy of stops


async def test_smtp_down_for_a_while_delivers_once_it_is_back_exactly_once(tmp_path: Path):
    sink = SmtpSink()  # not started: the mail server is down
    settings = parse_settings(
        POLICY.format(port=sink.port, public="https://hub.example.org").replace("[email]", "[email]"), env={}
    )
    store = Store.open(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    outbox = make_outbox(settings, store)
    t0 = datetime(2026, 11, 25, 18, 0, tzinfo=UTC)
    server = HubServer(user="bob", name="", started=t0 - timedelta(hours=3), last_activity=t0 - timedelta(hours=2),
                       url="/user/bob/")
    obs = Observation(server=server, state=State.DETACHED, at=t0, last_activity=t0 - timedelta(hours=2),
                      detached_since=t0 - timedelta(hours=2), detail="1 kernel (1 idle), 0 connections")
    dec = Decision(Action.FINAL, "window closed 2h ago; final notice now", notice=NoticeKind.FINAL,
                   spell=obs.idle_since, stop_at=t0 + timedelta(minutes=30), channels=("email",))
    try:
        assert store.runs.record(obs, dec, t0) is not None
        now = t0
        for _ in range(3):  # down: each try fails temporarily and is rescheduled
            assert await outbox.drain(now) == 0
            now += timedelta(minutes=2)
        assert store.runs.histories([server.run_key()])[server.run_key()].notices[0].delivered_at is None
        sink.start()
        delivered = 0
        for _ in range(6):
            now += timedelta(minutes=30)
            delivered += await outbox.drain(now)
        assert delivered == 1
        assert [kind_of(m.message) for m in sink.messages] == ["final"]
        hist = store.runs.histories([server.run_key()])[server.run_key()]
        assert hist.notices[0].delivered_at is not None
    finally:
        store.close()
        sink.stop()
