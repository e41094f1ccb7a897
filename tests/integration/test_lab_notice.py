"""The reaper's notice inside JupyterLab, in a real browser, through the real hub.

Real parts started: JupyterHub 6 (the shipped hub/jupyterhub_config.py, with this checkout's notice
extension enabled in the single-user servers and the prebuilt JupyterLab extension on their
JUPYTER_PATH), configurable-http-proxy, two single-user servers of one user (JupyterLab 4), and Debian's
Chromium driven by Playwright in the Asia/Tokyo time zone (so that local time is not UTC).

The notice is PUT with the reaper service's token, as the lab channel does (the full sweep -> notice ->
Lab path is wired after the companion is merged). Proves: the open Lab shows the notification with the
stop time in the user's local time; the countdown shows the stop, and the walltime end when earlier;
Keep running is tracked activity and sets kept_at; Stop now stops the server through the hub, and on a
server whose token may not, says so; another user's token is refused; a hidden tab makes no request.
Screenshots for the README: docs/lab-notification.png, docs/lab-countdown.png.
"""

from __future__ import annotations

import re
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.harness import require_real_part
from tests.harness.hub import RealHub, missing_parts
from tests.harness.lab import (
    CHROMIUM,
    CHROMIUM_ARGS,
    iso,
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
REFUSED = "refused"  # a named server whose token the hub does not let stop its server

REFUSE_STOP = """
_shipped_scopes = list(c.Spawner.server_token_scopes)
c.Spawner.server_token_scopes = lambda spawner: (
    [s for s in _shipped_scopes if not s.startswith("delete:")] if spawner.name == {refused!r} else _shipped_scopes)
"""


def test_the_notice_in_jupyterlab_keep_stop_countdown_and_privacy(tmp_path):
    require_real_part(not missing_parts(), f"a real JupyterHub ({', '.join(missing_parts())} missing)")
    require_browser()
    from playwright.sync_api import expect, sync_playwright

    wrapper = lab_hub_config(tmp_path, REFUSE_STOP.format(refused=REFUSED))
    ARTIFACTS.mkdir(exist_ok=True)
    user, other = "labuser", "otheruser"
    hub = RealHub(tmp_path / "hub", config_file=wrapper, extra_env={"PYTHONPATH": str(ROOT)})
    hub.start()
    service = {"Authorization": f"token {hub.service_token}"}
    try:
        hub.create_user(user)
        hub.create_user(other)
        hub.start_server(user)
        hub.start_server(user, REFUSED)
        own = hub.direct_url(user)  # the server's own address, as the lab channel reaches it
        refused_own = hub.direct_url(user, REFUSED)

        def put(base: str, **notice) -> None:
            r = httpx.put(base + "api/reaper/notice?no_track_activity=1", headers=service, json=notice)
            assert r.status_code == 200, r.text

        def pending(base: str) -> dict:
            r = httpx.get(base + "api/reaper/notice?no_track_activity=1", headers=service)
            assert r.status_code == 200, r.text
            return r.json()

        def last_activity(base: str) -> datetime:
            r = httpx.get(base + "api/status", headers=service)
            return datetime.fromisoformat(r.json()["last_activity"].replace("Z", "+00:00"))

        # privacy: another user's token reads nothing of this server; the user's own token sets no notice
        tokens = {}
        for who in (user, other):
            r = hub.api("POST", f"users/{who}/tokens", json={"note": "test"})
            assert r.status_code in (200, 201), r.text
            tokens[who] = r.json()["token"]
        for method in ("GET", "PUT", "DELETE"):
            r = httpx.request(method, own + "api/reaper/notice", headers={"Authorization": f"token {tokens[other]}"},
                              json={"id": 1, "kind": "warning", "stop_at": iso(datetime.now(UTC))})
            assert r.status_code == 403, (method, r.status_code, r.text)
        r = httpx.put(own + "api/reaper/notice", headers={"Authorization": f"token {tokens[user]}"},
                      json={"id": 1, "kind": "warning", "stop_at": iso(datetime.now(UTC))})
        assert r.status_code == 403 and "reaper service" in r.text

        stop_at = (datetime.now(UTC) + timedelta(minutes=42)).replace(second=0, microsecond=0)
        local = stop_at.astimezone(ZoneInfo(TZ))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                ctx = browser.new_context(timezone_id=TZ, locale="en-GB", viewport={"width": 1280, "height": 800})
                page = ctx.new_page()
                login(page, hub, user)
                open_lab(page, hub, user)

                # 1. a warning PUT by the reaper's token: the notification, in local time, and the countdown
                put(own, id="n1", kind="warning", stop_at=iso(stop_at), walltime_end=None, hub="Test Hub",
                    server="", reason="window closed 1 h ago")
                toast = page.locator(".Toastify__toast").filter(has_text="will be stopped at")
                expect(toast).to_be_visible(timeout=30_000)
                expect(toast).to_contain_text(f"stopped at {local:%H:%M}")
                expect(toast.get_by_role("button", name="Keep running")).to_be_visible()
                expect(toast.get_by_role("button", name="Stop now")).to_be_visible()
                countdown = page.locator(".jp-reaper-countdown")
                expect(countdown).to_have_attribute("data-deadline", "stop")
                expect(countdown).to_contain_text(re.compile(r"Stops in 4[012] min"))
                expect(countdown).to_contain_text(f"{local:%H:%M}")
                still(page)
                page.screenshot(path=str(DOCS / "lab-notification.png"))

                # 2. a reminder whose job ends at its walltime first: the countdown shows the walltime end
                wall = stop_at - timedelta(minutes=25)
                put(own, id="n2", kind="reminder", stop_at=iso(stop_at), walltime_end=iso(wall), hub="Test Hub",
                    server="", reason="window closed 1 h ago")
                expect(countdown).to_have_attribute("data-deadline", "walltime", timeout=30_000)
                expect(countdown).to_contain_text("Job ends in 1")
                expect(countdown).to_contain_text(f"{wall.astimezone(ZoneInfo(TZ)):%H:%M}")
                toast = page.locator(".Toastify__toast").filter(has_text="ends at")
                expect(toast).to_be_visible()
                expect(page.locator(".Toastify__toast").filter(has_text="will be stopped at")).to_have_count(0)
                still(page)
                page.locator("#jp-main-statusbar").screenshot(path=str(ARTIFACTS / "lab-statusbar.png"))
                page.screenshot(path=str(DOCS / "lab-countdown.png"))

                # 3. Keep running: tracked activity, kept_at remembered, the notification and countdown gone
                before = datetime.now(UTC)
                toast.get_by_role("button", name="Keep running").click()
                expect(page.locator(".Toastify__toast").filter(has_text="Kept running")).to_be_visible()
                view = wait(lambda: (v := pending(own))["kept_at"] and v, 15, "kept_at")
                kept_at = datetime.fromisoformat(view["kept_at"].replace("Z", "+00:00"))
                assert view["notice"] is None and view["kept_notice"] == "n2" and kept_at >= before - timedelta(seconds=1)
                assert last_activity(own) >= kept_at - timedelta(seconds=1)
                expect(countdown).to_be_hidden()

                # 4. a hidden tab asks nothing (a forgotten background tab must still become idle)
                asked: list[str] = []
                page.on("request", lambda req: asked.append(req.url) if "api/reaper/notice" in req.url else None)
                set_hidden(page, True)
                asked.clear()
                time.sleep(25)  # more than two of the extension's poll periods (10 s)
                assert asked == []
                set_hidden(page, False)
                wait(lambda: asked, 10, "a poll once the tab is visible again")
                assert all("no_track_activity=1" in u for u in asked)

                # 5. Stop now on a server whose token may not stop it: a clear message, the server still runs
                page2 = ctx.new_page()
                page2.goto(hub.server_url(user, REFUSED) + "lab")
                expect(page2.locator("#jp-main-statusbar")).to_be_visible(timeout=60_000)
                put(refused_own, id="r1", kind="final", stop_at=iso(stop_at), walltime_end=None, hub="Test Hub",
                    server=REFUSED, reason="window closed 2 h ago")
                toast2 = page2.locator(".Toastify__toast").filter(has_text="will be stopped at")
                expect(toast2).to_be_visible(timeout=30_000)
                toast2.get_by_role("button", name="Stop now").click()
                page2.locator(".jp-Dialog").get_by_role("button", name="Stop now").click()
                expect(page2.locator(".Toastify__toast").filter(has_text="Could not stop this server from here")
                       ).to_contain_text("Hub Control Panel")
                assert hub.server_model(user, REFUSED) is not None
                page2.close()

                # 6. Stop now: after the confirm, the hub stops this server
                put(own, id="n3", kind="final", stop_at=iso(stop_at), walltime_end=None, hub="Test Hub", server="",
                    reason="window closed 2 h ago")
                toast = page.locator(".Toastify__toast").filter(has_text="will be stopped at")
                expect(toast).to_be_visible(timeout=30_000)
                toast.get_by_role("button", name="Stop now").click()
                dialog = page.locator(".jp-Dialog")
                expect(dialog).to_contain_text("Stop this server now?")
                dialog.get_by_role("button", name="Stop now").click()
                expect(page.locator(".Toastify__toast").filter(has_text="Stopping this server")).to_be_visible()
                wait(lambda: hub.server_model(user) is None, 60, "the hub to stop the server")
            finally:
                browser.close()
    finally:
        hub.stop()
        if (tmp_path / "hub" / "jupyterhub.log").exists():
            shutil.copy(tmp_path / "hub" / "jupyterhub.log", ARTIFACTS / "lab-notice-hub.log")

