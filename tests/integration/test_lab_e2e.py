"""The whole way of issue #15, from the reaper's sweep to the user's JupyterLab and back.

Real parts started: JupyterHub 6 (the shipped hub config; the companion and this checkout's prebuilt
JupyterLab extension in the single-user servers, tests/harness/lab.py), configurable-http-proxy, one
single-user server (JupyterLab 4) with a notebook open in Debian's Chromium (Playwright, Asia/Tokyo),
an SMTP sink (aiosmtpd), and the reaper in-process: a ReaperService's store (SQLite), hub client,
outbox with the channels [lab, email], and its web page, proxied by the hub at /services/reaper/.
The test runs the sweeps itself (one a second, none while the browser acts: a real reaper sweeps
every few minutes), so that each step is decided by the reaper's own sweep.

Thresholds: a visible JupyterLab polls its server about every 10 s, which is activity: the tab is in
use. So ``attached.warn_after`` is 15 s, longer than that gap; a tab left in the background stops
polling, and its idle spell reaches the warning 5-15 s later.

1. the notebook tab is hidden; the sweep warns; the lab channel PUTs the notice (no hand PUT) and the
   e-mail goes out; the tab comes back: the notification shows the stop in the browser's local time;
2. Keep running: the server is not stopped after ``stop_after``; the reaper's DELETE reads the keep
   and records it ("kept from JupyterLab", actor the user);
3. the user's second server (no tab on it, warned at once by the rule "mailed"): its warning e-mail
   carries the signed keep link: the confirm page (GET, no hub login) changes nothing, its button keeps
   the server for 2 h, the scheduled stop moves, and that server's JupyterLab no longer holds the old
   notice (docs/keep-confirm.png);
4. the first tab hidden again, a new warning: Stop now in JupyterLab stops the server through the hub.
"""

from __future__ import annotations

import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from reaper.config import parse_settings
from reaper.core.model import Action, State
from reaper.notify.keeplinks import link_id
from reaper.service import ReaperService, make_hub_client, make_outbox
from reaper.store import Store
from reaper.sweep import Sweeper
from tests.adapters.smtp_sink import SmtpSink
from tests.harness import require_real_part
from tests.harness.hub import RealHub, free_ports, missing_parts
from tests.harness.lab import (
    CHROMIUM,
    CHROMIUM_ARGS,
    LoopThread,
    lab_hub_config,
    login,
    open_lab,
    require_browser,
    set_hidden,
    still,
    wait,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
ARTIFACTS = ROOT / "artifacts"
TZ = "Asia/Tokyo"
STOP_AFTER = timedelta(seconds=30)
MAILED = "mailed"  # a second server of the user, nobody's tab on it: its warning e-mail's keep link

CONFIG = """
sweep_every: 1h  # the test sweeps
database_url: "sqlite:///{db}"
hub: {{timezone: Asia/Tokyo, name: "Test Hub", public_url: "{public}", api_url: "{api}",
      api_token: "${{REAPER_E2E_TOKEN}}"}}
probe: {{skip_fresh: false, attached_within: 3s, timeout: 5s}}
safety: {{max_stops_per_sweep: 5, max_stop_fraction: 1.0}}
defaults:
  attached: {{warn_after: 15s, stop_after: 30s}}
  detached: {{warn_after: 1h, stop_after: 2h}}
  remind_every: 1h
  min_notice: 8s
  channels: [lab, email]
notify:
  email: {{host: 127.0.0.1, port: {port}, security: none, from_addr: "Test Hub <hub@example.org>",
          address_template: "{{username}}@example.org"}}
rules:
  - name: mailed  # the server of the keep link: nobody's tab on it, warned at once, stopped in 30 min
    match: {{servers: [mailed]}}
    detached: {{warn_after: 3s, stop_after: 30m}}
    attached: {{warn_after: 1h, stop_after: 2h}}
    min_notice: 5m
web:
  listen: "http://127.0.0.1:{web_port}"
  prefix: /services/reaper/
"""

NOTEBOOK = {"cells": [], "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}


async def start_reaper(svc: ReaperService) -> None:
    """ReaperService.start without its scheduler: the store, hub client, outbox, sweeper and page."""
    s = svc.settings
    svc.store = Store.open(s.database_url)
    svc.hub = make_hub_client(s)
    svc.outbox = make_outbox(s, svc.store, hub=svc.hub)
    svc.sweeper = Sweeper(s, svc.hub, svc.store, notifier=svc.outbox)
    await svc.start_web()


def parse(t: str) -> datetime:
    return datetime.fromisoformat(t.replace("Z", "+00:00"))


def text(msg) -> str:
    return msg.message.get_body(preferencelist=("plain",)).get_content()


def test_from_the_sweep_to_jupyterlab_keep_keep_link_and_stop(tmp_path):
    require_real_part(not missing_parts(), f"a real JupyterHub ({', '.join(missing_parts())} missing)")
    require_browser()
    from playwright.sync_api import expect, sync_playwright

    began = time.monotonic()
    marks: list[str] = []

    def mark(what: str) -> None:
        marks.append(f"{what} {time.monotonic() - began:.0f}s")
    ARTIFACTS.mkdir(exist_ok=True)
    user = "labe2e"
    web_port = free_ports(1)[0]
    with SmtpSink() as sink, LoopThread() as loop, ThreadPoolExecutor(1) as pool:
        hub = RealHub(tmp_path / "hub", config_file=lab_hub_config(tmp_path), extra_env={"PYTHONPATH": str(ROOT)},
                      service_url=f"http://127.0.0.1:{web_port}")
        settings = parse_settings(CONFIG.format(db=tmp_path / "reaper.sqlite", public=hub.base_url, api=hub.api_url,
                                                port=sink.port, web_port=web_port),
                                  env={"REAPER_E2E_TOKEN": hub.service_token})
        svc = ReaperService(None, settings)
        try:
            loop.run(start_reaper(svc))  # its page first: the hub waits for an external service's URL
            hub.start()
            mark("hub")
            assert svc.store is not None and svc.sweeper is not None
            t0 = datetime.now(UTC) - timedelta(minutes=1)
            service = {"Authorization": f"token {hub.service_token}"}
            hub.create_user(user)
            starting = pool.submit(hub.start_server, user, MAILED)  # ready by step 3
            hub.start_server(user)
            mark("server")
            own = hub.direct_url(user)
            r = httpx.put(own + "api/contents/idle.ipynb", headers=service,
                          json={"type": "notebook", "format": "json", "content": NOTEBOOK})
            assert r.status_code in (200, 201), r.text

            def pending(base: str = own) -> dict:
                r = httpx.get(base + "api/reaper/notice?no_track_activity=1", headers=service)
                assert r.status_code == 200, r.text
                return r.json()

            def connections() -> int:
                r = httpx.get(own + "api/kernels?no_track_activity=1", headers=service)
                return sum(k.get("connections", 0) for k in r.json())

            seen: list[tuple[str, str]] = []

            def sweep(server: str = ""):
                res = loop.run(svc.sweeper.run_once())
                assert res.ok, res.error
                for r in res.rows:
                    assert r.decision.action is not Action.STOP, (r.obs.server.name, r.decision.reason, seen)
                rows = {r.obs.server.name: r for r in res.rows if r.obs.server.user == user}
                row = rows.get(server)
                seen.append((row.obs.state.value, row.decision.action.value) if row else ("gone", ""))
                return row

            def sweep_until_warned(timeout: float = 45):
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    row = sweep()
                    if row is not None and row.decision.action is Action.WARN:
                        return row
                    time.sleep(1)
                raise AssertionError(f"no warning within {timeout}s; seen {seen[-12:]}")

            def warnings(server: str = "") -> list:
                named = f"/user/{user}/{MAILED}/"  # the other server's address is in its notices only
                return [m for m in sink.messages if f"{user}@example.org" in m.rcpt_tos
                        and m.message["X-Reaper-Notice"] == "warning" and (named in text(m)) == (server == MAILED)]

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                try:
                    ctx = browser.new_context(timezone_id=TZ, locale="en-GB", viewport={"width": 1280, "height": 800})
                    page = ctx.new_page()
                    mark("servers")
                    login(page, hub, user)
                    open_lab(page, hub, user, "lab/tree/idle.ipynb")
                    wait(lambda: connections() >= 1, 60, "the notebook's kernel connection")

                    mark("lab open")
                    # 1. the tab left in the background: the reaper's sweep warns, through the lab channel
                    set_hidden(page, True)
                    row = sweep_until_warned()
                    assert row.obs.state is State.ATTACHED and row.obs.browser_connected, row.obs.detail
                    spell, stop_at = row.decision.spell, row.decision.stop_at
                    assert spell is not None and stop_at == spell + STOP_AFTER, row.decision
                    notice = wait(lambda: pending()["notice"], 10, "the notice PUT by the lab channel")
                    assert notice["kind"] == "warning" and parse(notice["stop_at"]) == stop_at, notice
                    wait(warnings, 15, "the warning e-mail")
                    mark("warned")
                    local = stop_at.astimezone(ZoneInfo(TZ))
                    set_hidden(page, False)  # the user comes back to the tab
                    toast = page.locator(".Toastify__toast").filter(has_text="will be stopped at")
                    expect(toast).to_be_visible(timeout=20_000)
                    expect(toast).to_contain_text(f"stopped at {local:%H:%M}")
                    countdown = page.locator(".jp-reaper-countdown")
                    expect(countdown).to_have_attribute("data-deadline", "stop")
                    expect(countdown).to_contain_text(f"{local:%H:%M}")
                    still(page)
                    page.screenshot(path=str(ARTIFACTS / "lab-e2e-notification.png"))

                    mark("notification")
                    # 2. Keep running: no stop after stop_after, and the reaper records the keep
                    toast.get_by_role("button", name="Keep running").click()
                    expect(page.locator(".Toastify__toast").filter(has_text="Kept running")).to_be_visible()
                    wait(lambda: pending()["kept_at"], 15, "kept_at in the companion")
                    while datetime.now(UTC) < stop_at + timedelta(seconds=3):
                        sweep()
                        time.sleep(1)
                    assert hub.server_model(user) is not None, "the server was stopped after Keep running"
                    keeps = [a for a in svc.store.reports.recent_actions(t0) if a.kind == "keep" and a.user == user]
                    assert len(keeps) == 1, keeps
                    assert "kept from JupyterLab" in keeps[0].detail and keeps[0].actor == user and keeps[0].ok
                    view = pending()
                    assert view["notice"] is None and view["kept_at"] is None  # the reaper's DELETE read it

                    mark("kept")
                    # 3. the keep link of the other server's warning e-mail: GET changes nothing; the button keeps
                    starting.result(60)
                    mailed = hub.direct_url(user, MAILED)
                    msg = wait(lambda: warnings(MAILED) and warnings(MAILED)[0], 15, "the other server's warning e-mail")
                    found = re.search(r"(http://127\.0\.0\.1:\d+/services/reaper/keep-link\?t=[^\s>)]+)", text(msg))
                    assert found, text(msg)
                    link = found.group(1)
                    token = link.split("?t=", 1)[1]
                    notice = pending(mailed)["notice"]  # shown in that server's JupyterLab by the lab channel
                    assert notice is not None and notice["server"] == MAILED, notice
                    key = sweep(MAILED).obs.server.run_key()
                    assert key is not None
                    confirm = browser.new_context(timezone_id=TZ, locale="en-GB",  # no hub login
                                                  viewport={"width": 900, "height": 300}).new_page()
                    confirm.goto(link)
                    button = confirm.get_by_role("button", name="Keep running for 2h")
                    expect(button).to_be_visible()
                    stop_words = f"{parse(notice['stop_at']).astimezone(ZoneInfo(TZ)):%H:%M}"
                    expect(confirm.locator("body")).to_contain_text(stop_words)
                    assert svc.store.runs.histories([key])[key].kept_until is None  # the GET changed nothing
                    assert svc.store.keeplinks.used_at(link_id(token)) is None
                    confirm.screenshot(path=str(DOCS / "keep-confirm.png"))
                    pressed = datetime.now(UTC)
                    button.click()
                    expect(confirm.locator("body")).to_contain_text("Your server keeps running")
                    kept_until = svc.store.runs.histories([key])[key].kept_until
                    assert kept_until is not None and kept_until >= pressed + timedelta(hours=2, seconds=-5), kept_until
                    assert kept_until > parse(notice["stop_at"]), (kept_until, notice)
                    assert svc.store.keeplinks.used_at(link_id(token)) is not None
                    row = sweep(MAILED)
                    assert row is not None and row.decision.stop_at is None, row.decision  # the stop moved
                    assert "kept running by the user" in row.decision.reason
                    assert pending(mailed)["notice"] is None  # and that JupyterLab no longer shows the old stop
                    confirm.screenshot(path=str(ARTIFACTS / "keep-confirm-kept.png"))
                    confirm.context.close()

                    mark("keep link")
                    # 4. hidden again: a new warning; the user comes back and presses Stop now
                    set_hidden(page, True)
                    sweep_until_warned()
                    mark("warned again")
                    set_hidden(page, False)
                    toast = page.locator(".Toastify__toast").filter(has_text="will be stopped at")
                    expect(toast).to_be_visible(timeout=20_000)
                    toast.get_by_role("button", name="Stop now").click()
                    page.locator(".jp-Dialog").get_by_role("button", name="Stop now").click()
                    expect(page.locator(".Toastify__toast").filter(has_text="Stopping this server")).to_be_visible()
                    wait(lambda: hub.server_model(user) is None, 60, "the hub to stop the server")
                    assert sweep() is None
                finally:
                    browser.close()
        finally:
            loop.run(svc.stop())
            hub.stop()
            if (tmp_path / "hub" / "jupyterhub.log").exists():
                shutil.copy(tmp_path / "hub" / "jupyterhub.log", ARTIFACTS / "lab-e2e-hub.log")
    mark("done")
    print(f"test_lab_e2e: {', '.join(marks)}; sweeps: {seen}")
