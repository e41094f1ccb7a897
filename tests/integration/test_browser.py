"""A real browser on the reaper's page, through the real hub.

Real parts started: JupyterHub 6 (shipped hub/jupyterhub_config.py) with the reaper as its managed
service serving its page (REAPER_SERVICE_URL), configurable-http-proxy, a single-user server, an
SMTP sink (aiosmtpd) receiving the notices, and Debian's Chromium driven by Playwright.

The user opens the page from the link in the warning e-mail, logs in at the hub, presses
"Keep running" and sees the scheduled stop move; an admin sees every server and the dry run;
the user presses "Stop now" and the server is gone from the hub. Screenshots go to artifacts/.
"""

from __future__ import annotations

import re
import secrets
import shutil
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.adapters.smtp_sink import SmtpSink
from tests.harness import require_real_part
from tests.harness.hub import HUB_CONFIG, HUB_VERSIONS, RealHub, free_ports, missing_parts

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

CONFIG = """
sweep_every: 2s
database_url: "sqlite:///{db}"
hub: {{timezone: America/Montreal, name: "Test Hub", public_url: "{public}"}}
probe: {{skip_fresh: false, attached_within: 3s}}
defaults:
  detached: {{warn_after: 3s, stop_after: 2h}}
  remind_every: 1h
  min_notice: 30m
  channels: [email]
notify:
  email: {{host: 127.0.0.1, port: {port}, security: none, from_addr: "Test Hub <hub@example.org>",
          address_template: "{{username}}@example.org"}}
web:
  keep: {{max_extension: 4h, choices: [1h, 4h]}}
"""


# Users need the scope access:services!service=reaper to log in to the page (JupyterHub's default
# "user" role holds only "self"). Until the shipped hub config grants it, add it on top of that file.
HUB_CONFIG_WITH_ACCESS = """
c = get_config()  # noqa: F821
load_subconfig({shipped!r})  # noqa: F821
c.JupyterHub.load_roles = [r for r in c.JupyterHub.load_roles if r.get("name") != "user"] + [
    {{"name": "user", "scopes": ["self", "access:services!service=reaper"]}}
]
"""


def hub_config(tmp_path: Path) -> Path:
    text = HUB_CONFIG.read_text()
    if "access:services!service=reaper" in text:
        return HUB_CONFIG
    wrapper = tmp_path / "jupyterhub_config.py"
    wrapper.write_text(HUB_CONFIG_WITH_ACCESS.format(shipped=str(HUB_CONFIG)))
    return wrapper


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kept_until(db: Path, user: str) -> datetime | None:
    with sqlite3.connect(db) as con:
        row = con.execute("select kept_until from reaper_runs where user = ? and ended_at is null", (user,)).fetchone()
    if not row or not row[0]:
        return None
    t = datetime.fromisoformat(str(row[0]))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@pytest.mark.parametrize("hub_version", HUB_VERSIONS, ids=lambda v: f"hub{v}")
def test_user_keeps_then_stops_their_server_in_a_real_browser(tmp_path, hub_version):
    missing = missing_parts(hub_version)
    require_real_part(not missing, f"a real JupyterHub {hub_version} ({', '.join(missing)} missing)")
    require_real_part(Path(CHROMIUM).exists(), "Debian's chromium (/usr/bin/chromium)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        require_real_part(False, "playwright for Python")
        raise

    ARTIFACTS.mkdir(exist_ok=True)
    user, admin = "webuser", "boss"
    admin_password = secrets.token_urlsafe(32)
    service_port = free_ports(1)[0]
    db = tmp_path / "reaper.sqlite"
    cfg = tmp_path / "reaper.yaml"
    with SmtpSink() as sink:
        hub = RealHub(tmp_path / "hub", managed=True, reaper_config=cfg,
                      service_url=f"http://127.0.0.1:{service_port}",
                      extra_env={"REAPER_HUB_ADMINS": admin, "REAPER_HUB_ADMIN_PASSWORD": admin_password},
                      config_file=hub_config(tmp_path), version=hub_version)
        cfg.write_text(CONFIG.format(db=db, public=hub.base_url, port=sink.port))
        hub.start()
        try:
            hub.create_user(user)
            hub.create_user(admin)
            hub.start_server(user)

            # 1. the warning e-mail arrives (no browser on the server: detached) with the page's link
            msg = wait(lambda: next((m for m in sink.messages if f"{user}@example.org" in m.rcpt_tos
                                     and m.message["X-Reaper-Notice"] == "warning"), None),
                       60, "the warning notice by e-mail")
            body = msg.message.get_body(preferencelist=("plain",)).get_content()
            # (the page's link, "Your servers", not the one-click keep link, which needs no login)
            link = re.search(r"(http://127\.0\.0\.1:\d+/services/reaper/(?!keep-link)\S*)", body)
            assert link, body
            url = link.group(1).rstrip(".>)")

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                try:
                    page = browser.new_page()
                    # 2. the link leads to the hub's login, then back to the page (JupyterHub's HubOAuth, reaper.web.auth)
                    page.goto(url)
                    page.fill("input[name=username]", user)
                    page.fill("input[name=password]", hub.password)
                    page.click("input[type=submit], button[type=submit]")
                    page.wait_for_url(re.compile(r".*/services/reaper/.*"))
                    card = page.locator(f"#server-{user}-default")
                    expect(card).to_be_visible()
                    expect(card.locator("time.stop-at")).to_be_visible()
                    stop_before = datetime.fromisoformat(card.locator("time.stop-at").get_attribute("datetime"))

                    # 3. Keep running for 4h: the scheduled stop moves
                    card.locator("select[name=duration]").select_option("4h")
                    card.get_by_role("button", name="Keep running").click()
                    expect(page.locator(".alert.ok")).to_contain_text("keeps running")
                    expect(card).to_contain_text("Kept running until")
                    until = kept_until(db, user)
                    assert until is not None and until > datetime.now(UTC) + timedelta(hours=3, minutes=55)
                    assert until > stop_before  # later than the stop the idle deadline had scheduled
                    # the old scheduled stop is gone from the card (or, if shown, not before the keep)
                    for el in card.locator("time.stop-at").all():
                        assert datetime.fromisoformat(el.get_attribute("datetime")) >= until
                    page.screenshot(path=str(ARTIFACTS / "web-user-view.png"), full_page=True)

                    # 4. an admin sees every server and what the next sweep would do
                    admin_page = browser.new_context().new_page()
                    admin_page.goto(f"{hub.base_url}/services/reaper/?dry_run=1")
                    admin_page.fill("input[name=username]", admin)
                    admin_page.fill("input[name=password]", admin_password)
                    admin_page.click("input[type=submit], button[type=submit]")
                    admin_page.wait_for_url(re.compile(r".*/services/reaper/.*"))
                    expect(admin_page.locator("section.admin")).to_contain_text("All servers")
                    expect(admin_page.locator("section.admin")).to_contain_text(user)
                    expect(admin_page.locator("section.admin")).to_contain_text("Nothing was changed")
                    admin_page.screenshot(path=str(ARTIFACTS / "web-admin-view.png"), full_page=True)

                    # 5. Stop now: the server is gone from the hub
                    card.get_by_role("button", name="Stop now").click()
                    expect(page.locator(".alert.ok")).to_contain_text("stop")
                    wait(lambda: hub.server_model(user) is None, 60, "the hub to forget the server")
                    page.goto(f"{hub.base_url}/services/reaper/")
                    expect(page.locator(f"#server-{user}-default")).to_have_count(0)
                    page.screenshot(path=str(ARTIFACTS / "web-user-after-stop.png"), full_page=True)
                finally:
                    browser.close()
            with sqlite3.connect(db) as con:
                actions = con.execute("select kind, actor from reaper_actions where kind in ('keep', 'stop')").fetchall()
            assert ("keep", user) in actions and ("stop", user) in actions
        finally:
            hub.stop()
            if (tmp_path / "hub" / "jupyterhub.log").exists():
                shutil.copy(tmp_path / "hub" / "jupyterhub.log", ARTIFACTS / "web-browser-hub.log")
