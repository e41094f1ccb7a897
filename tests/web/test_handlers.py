# ruff: noqa: F811  (pytest fixtures imported from tests.web are parameters here)
"""The reaper's page: authorization, xsrf, keep running, stop now, admin views, escaping, headers,
/health. A real tornado server, the real login (JupyterHub's HubOAuth: cookies, xsrf; reaper.web.auth), a real SQLite store
and a real Sweeper; the hub is scripted (tests/fakes.py). The OAuth flow itself: tests/web/test_login.py."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from reaper.core.model import RunKey
from reaper.sweep import SweepResult
from reaper.web.handlers import reclaimed
from tests.web import PREFIX, hub_server, make_web, utcnow, web  # noqa: F401  (fixtures)


def key_of(w, user: str, name: str = "") -> RunKey:
    s = w.hub.servers[(user, name)]
    k = s.run_key()
    assert k is not None
    return k


def kept(w, user: str, name: str = "") -> datetime | None:
    k = key_of(w, user, name)
    return w.store.runs.histories([k])[k].kept_until


# --------------------------------------------------------------------------- who sees what


async def test_a_user_sees_only_their_own_servers_on_the_page_and_in_the_api(web):
    r = await web.get("", "alice")
    assert r.status_code == 200
    assert 'name="user" value="alice"' in r.text
    assert "bob" not in r.text
    api = (await web.get("api/servers", "alice")).json()
    assert [s["user"] for s in api["servers"]] == ["alice"]


async def test_a_user_cannot_read_another_users_server_but_an_admin_can(web):
    assert (await web.get("api/servers/bob", "alice")).status_code == 403
    assert (await web.get("api/servers/alice", "alice")).json()["user"] == "alice"
    r = await web.get("api/servers/bob", "root")
    assert r.status_code == 200 and r.json()["user"] == "bob"


async def test_a_user_cannot_keep_or_stop_another_users_server(web):
    r = await web.post("keep", "alice", {"user": "bob", "server": "", "duration": "2h"})
    assert r.status_code == 403
    r = await web.post("stop", "alice", {"user": "bob", "server": "", "duration": "2h"})
    assert r.status_code == 403
    assert kept(web, "bob") is None
    assert web.hub.stops == []
    assert not [a for a in web.store.reports.recent_actions(utcnow() - timedelta(hours=1)) if a.kind in ("keep", "stop")]


@pytest.mark.parametrize("admin", ["root", "carol"])  # hub admin; member of web.admin_group
async def test_admins_by_hub_flag_or_configured_group_see_and_act_on_every_server(make_web, admin):
    w = await make_web("web: {admin_group: reaper-admins}\n")
    page = await w.get("", admin)
    assert 'value="bob"' in page.text and "All servers" in page.text
    assert {s["user"] for s in (await w.get("api/servers", admin)).json()["servers"]} == {"alice", "bob"}
    r = await w.post("keep", admin, {"user": "bob", "server": "", "duration": "1h"})
    assert r.status_code == 303
    assert kept(w, "bob") is not None
    r = await w.post("stop", admin, {"user": "alice", "server": ""})
    assert r.status_code == 303 and w.hub.stops == [("alice", "")]
    acts = w.store.reports.recent_actions(utcnow() - timedelta(hours=1))
    assert {(a.kind, a.user, a.actor) for a in acts} == {("keep", "bob", admin), ("stop", "alice", admin)}


async def test_the_admin_group_grants_nothing_when_not_configured(web):
    assert "All servers" not in (await web.get("", "carol")).text
    assert (await web.get("api/servers/bob", "carol")).status_code == 403
    assert (await web.get("api/admin/summary", "carol")).status_code == 403
    assert (await web.get("api/admin/next-sweep", "alice")).status_code == 403


async def test_without_login_the_page_redirects_to_the_hub_and_the_api_refuses(web):
    r = await web.get("", None)
    assert r.status_code == 302
    assert r.headers["location"].startswith("/hub/api/oauth2/authorize?client_id=service-reaper")
    assert (await web.get("api/servers", None)).status_code == 403
    r = await web.post("stop", None, {"user": "alice", "server": ""}, xsrf=False)
    assert r.status_code == 403 and web.hub.stops == []


# --------------------------------------------------------------------------- xsrf


async def test_posts_without_the_xsrf_token_are_refused(web):
    r = await web.post("stop", "alice", {"user": "alice", "server": ""}, xsrf=False)
    assert r.status_code == 403
    r = await web.post("keep", "alice", {"user": "alice", "server": "", "duration": "1h", "_xsrf": "forged"},
                       xsrf=False)
    assert r.status_code == 403
    assert web.hub.stops == [] and kept(web, "alice") is None
    # another user's token is not accepted either
    bobs = await web.xsrf("bob")
    r = await web.post("stop", "alice", {"user": "alice", "server": "", "_xsrf": bobs}, xsrf=False)
    assert r.status_code == 403 and web.hub.stops == []


# --------------------------------------------------------------------------- keep running


async def test_keep_running_moves_kept_until_records_who_and_shows_on_the_page(web):
    before = utcnow()
    r = await web.post("keep", "alice", {"user": "alice", "server": "", "duration": "2h"})
    assert r.status_code == 303 and r.headers["location"] == PREFIX + "?msg=kept"
    until = kept(web, "alice")
    assert until is not None and before + timedelta(hours=2) <= until <= utcnow() + timedelta(hours=2)
    [a] = [a for a in web.store.reports.recent_actions(before - timedelta(seconds=1)) if a.kind == "keep"]
    assert a.actor == "alice" and a.user == "alice" and a.ok
    page = (await web.get("?msg=kept", "alice")).text
    assert "Kept running until" in page and "your server keeps running" in page
    # a scheduled stop still shown is never before the time the server is kept until
    for iso in re.findall(r'class="stop-at" datetime="([^"]+)"', page):
        assert datetime.fromisoformat(iso) >= until
    api = (await web.get("api/servers/alice", "alice")).json()
    assert datetime.fromisoformat(api["kept_until"]["iso"]) == until


async def test_keep_running_as_json_answers_the_new_time_and_the_earliest_stop(web):
    r = await web.post("keep", "alice", {"user": "alice", "server": "", "duration": "1h"},
                       headers={"Accept": "application/json"})
    body = r.json()
    assert r.status_code == 200 and body["result"] == "kept"
    until = datetime.fromisoformat(body["kept_until"])
    assert datetime.fromisoformat(body["earliest_stop"]) == until + timedelta(minutes=30)  # + min_notice


async def test_keep_running_refuses_more_than_max_extension_and_more_than_max_per_day(make_web):
    w = await make_web("web: {keep: {max_extension: 4h, max_per_day: 2, choices: [1h, 4h]}}\n")
    r = await w.post("keep", "alice", {"user": "alice", "server": "", "duration": "5h"})
    assert r.status_code == 409 and "at most 4h" in r.text
    assert kept(w, "alice") is None
    for _ in range(2):
        assert (await w.post("keep", "alice", {"user": "alice", "server": "", "duration": "1h"})).status_code == 303
    r = await w.post("keep", "alice", {"user": "alice", "server": "", "duration": "1h"})
    assert r.status_code == 409 and "already kept running 2 times" in r.text
    r = await w.post("keep", "alice", {"user": "alice", "server": "", "duration": "soon"})
    assert r.status_code == 303 and "error=bad-duration" in r.headers["location"]


async def test_keep_running_never_goes_past_max_age(make_web):
    started = utcnow() - timedelta(hours=5)
    w = await make_web("  max_age: 6h\n", [hub_server("alice", started=started)])
    r = await w.post("keep", "alice", {"user": "alice", "server": "", "duration": "4h"})
    assert r.status_code == 303
    assert kept(w, "alice") == started + timedelta(hours=6)
    [a] = [a for a in w.store.reports.recent_actions(started) if a.kind == "keep"]
    assert "shortened to the longest a server may run" in a.detail


async def test_keep_running_is_refused_once_max_age_is_reached(make_web):
    started = utcnow() - timedelta(hours=7)
    w = await make_web("  max_age: 6h\n", [hub_server("alice", started=started)])
    r = await w.post("keep", "alice", {"user": "alice", "server": "", "duration": "1h"})
    assert r.status_code == 409 and "cannot be kept longer" in r.text


async def test_keep_running_never_goes_past_the_walltime_in_user_options(make_web):
    started = utcnow() - timedelta(hours=1)
    w = await make_web("", [hub_server("alice", started=started, user_options={"runtime": "2:00:00"})])
    assert (await w.post("keep", "alice", {"user": "alice", "server": "", "duration": "8h"})).status_code == 303
    assert kept(w, "alice") == started + timedelta(hours=2)


async def test_the_page_reads_slurmformspawner_options_and_says_times_as_the_notices_do(make_web):
    # slurmformspawner's form data: runtime in hours (a float), memory in MB, GPUs as a gres choice
    opts = {"runtime": 3.0, "nprocs": 4, "memory": 8000, "gpus": "gpu:v100:1", "ui": "lab"}
    w = await make_web("", [hub_server("alice", started=utcnow() - timedelta(hours=1), user_options=opts)])
    s = (await w.get("api/servers/alice", "alice")).json()
    assert (s["cpus"], s["gpus"], s["mem_gb"]) == (4, 1, 8000 / 1024)
    assert re.fullmatch(r"in (1h59m|2h)", s["job_end"]["relative"]), s["job_end"]
    assert re.fullmatch(r"(1h|59 min) ago", s["started"]["relative"]), s["started"]


async def test_a_kept_server_gets_no_stop_from_the_next_sweep(make_web):
    idle = utcnow() - timedelta(hours=10)
    from reaper.core.model import Kernel, Probe

    w = await make_web("", [hub_server("alice")], sweep=False)
    w.hub.probes[("alice", "")] = Probe(ok=True, status_last_activity=idle,
                                        kernels=(Kernel("k", "python3", "idle", 0, idle),))
    await w.service.sweeper.run_once()  # final notice goes out (10 h detached)
    assert (await w.post("keep", "alice", {"user": "alice", "server": "", "duration": "2h"})).status_code == 303
    res = await w.service.sweeper.run_once()
    assert res.rows[0].decision.action.value == "ok" and "kept running by the user" in res.rows[0].decision.reason
    assert w.hub.stops == []


async def test_keep_on_a_server_that_is_not_running_is_404(web):
    r = await web.post("keep", "alice", {"user": "alice", "server": "gpu", "duration": "1h"})
    assert r.status_code == 404


# --------------------------------------------------------------------------- stop now


async def test_stop_now_goes_through_stop_now_and_records_the_actor(web):
    k = key_of(web, "alice")
    r = await web.post("stop", "alice", {"user": "alice", "server": ""})
    assert r.status_code == 303 and r.headers["location"] == PREFIX + "?msg=stopped"
    assert web.hub.stops == [("alice", "")]
    [a] = [a for a in web.store.reports.recent_actions(utcnow() - timedelta(hours=1)) if a.kind == "stop"]
    assert a.actor == "alice" and "stop requested by alice" in a.detail
    assert k not in web.store.runs.open_runs()  # stop_now ended the run
    page = (await web.get("?msg=stopped", "alice")).text
    assert "the server was stopped" in page and 'name="user" value="alice"' not in page


async def test_a_failed_stop_is_said_as_such(web):
    web.hub.stop_outcome = "error"
    r = await web.post("stop", "alice", {"user": "alice", "server": ""}, headers={"Accept": "application/json"})
    assert r.status_code == 502 and r.json()["outcome"] == "error"


async def test_a_refused_stop_is_a_state_on_the_page_and_the_admin_view_and_leaves_the_server(web):
    # the hub's 403 (refresh_pre_stop: the user must log in again; tests/fixtures/stop_under_refresh_pre_stop.json)
    web.hub.stop_outcome = "refused"
    r = await web.post("stop", "alice", {"user": "alice", "server": ""}, headers={"Accept": "application/json"})
    assert r.status_code == 409 and r.json()["result"] == "stop-refused" and r.json()["outcome"] == "refused"
    r = await web.post("stop", "alice", {"user": "alice", "server": ""})
    assert r.status_code == 303 and r.headers["location"] == PREFIX + "?error=stop-refused"
    page = (await web.get("?error=stop-refused", "alice")).text
    assert "The hub refused to stop the server" in page  # the result, said
    assert "Stop refused" in page and 'name="user" value="alice"' in page  # the server's card, still there
    admin = (await web.get("", "root")).text
    assert "Stop refused" in admin and "<td>stop-refused</td>" in admin
    kinds = [a.kind for a in web.store.reports.recent_actions(utcnow() - timedelta(hours=1))]
    assert kinds.count("stop-refused") == 2 and "stop" not in kinds
    assert key_of(web, "alice") in web.store.runs.open_runs()  # the run goes on
    # once a stop goes through, the card no longer says refused
    web.hub.stop_outcome = "pending"
    await web.post("stop", "alice", {"user": "alice", "server": ""})
    assert "Stop refused" not in (await web.get("", "alice")).text


# --------------------------------------------------------------------------- admin views


async def test_admin_page_shows_totals_recent_actions_and_a_dry_run_that_changes_nothing(web):
    await web.post("stop", "alice", {"user": "alice", "server": ""})
    page = (await web.get("?window=24h", "root")).text
    assert "Servers stopped</dt><dd>1" in page and "(0 by the reaper, 1 on request)" in page
    assert "stop requested by alice" in page
    summary = (await web.get("api/admin/summary?window=24h", "root")).json()
    assert summary["totals"]["servers_stopped"] == 1
    assert summary["totals"]["reclaimed"]["unknown"] == 1  # no walltime recorded for that job
    before = web.store.reports.recent_actions(utcnow() - timedelta(hours=1))
    dry = (await web.get("?dry_run=1", "root")).text
    assert "What the next sweep would do" in dry and "Nothing was changed" in dry and "<td>bob</td>" in dry
    nxt = (await web.get("api/admin/next-sweep", "root")).json()
    assert [r["user"] for r in nxt["rows"]] == ["bob"] and nxt["ok"]
    assert web.store.reports.recent_actions(utcnow() - timedelta(hours=1)) == before
    assert web.hub.stops == [("alice", "")]


async def test_admin_summary_rejects_an_unknown_window(web):
    assert (await web.get("api/admin/summary?window=1y", "root")).status_code == 400


# --------------------------------------------------------------------------- safety of the output


async def test_user_controlled_values_are_escaped(make_web):
    evil = hub_server("alice", "x<b>y", user_options={"note": "<script>alert(1)</script>"})
    w = await make_web("", [evil])
    page = (await w.get("", "alice")).text
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "x<b>y" not in page and "x&lt;b&gt;y" in page


async def test_security_headers_and_no_tokens_in_the_output(web):
    r = await web.get("", "alice")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "same-origin"
    api = await web.get("api/servers", "root")
    for text in (r.text, api.text):
        assert "tok-alice" not in text and "service-token" not in text
    assert "target" not in api.text  # servers' internal addresses stay private


async def test_redirects_only_go_to_the_page_itself(web):
    r = await web.post("keep", "alice", {"user": "alice", "server": "", "duration": "1h",
                                         "next": "https://evil.example/"})
    assert r.headers["location"] == PREFIX + "?msg=kept"
    r = await web.client.get(web.base + PREFIX.rstrip("/"))
    assert r.status_code == 302 and r.headers["location"] == PREFIX
    assert (await web.get("nope", "alice")).status_code == 404


# --------------------------------------------------------------------------- /health


async def test_health_is_200_after_a_successful_sweep(web):
    r = await web.client.get(web.url("health"))
    assert r.status_code == 200 and r.json()["status"] == "ok"


async def test_health_is_200_right_after_start_and_503_when_no_sweep_ever_succeeds(make_web):
    w = await make_web(sweep=False)
    r = await w.client.get(w.url("health"))
    assert r.status_code == 200 and "starting" in r.json()["reason"]
    w.ctx.started_at = utcnow() - timedelta(minutes=16)  # > 3 x 5m
    w.service.last_result = SweepResult(started_at=utcnow(), finished_at=utcnow(), ok=False,
                                        error="HubListingError: HTTP 500")
    r = await w.client.get(w.url("health"))
    assert r.status_code == 503
    assert "no successful sweep" in r.json()["reason"] and "HTTP 500" in r.json()["reason"]


async def test_health_is_503_when_the_last_successful_sweep_is_too_old(make_web):
    w = await make_web()
    w.ctx.clock = lambda: datetime.now(UTC) + timedelta(minutes=16)
    r = await w.client.get(w.url("health"))
    assert r.status_code == 503 and "limit 15m" in r.json()["reason"]
    w.ctx.clock = lambda: datetime.now(UTC) + timedelta(minutes=14)
    assert (await w.client.get(w.url("health"))).status_code == 200


# --------------------------------------------------------------------------- pure helpers


NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)




def test_reclaimed_hours_count_from_the_stop_to_the_walltime_end():
    stops = [
        {"at": NOW, "started": NOW - timedelta(hours=1),
         "user_options": {"cpus": "4", "gpus": "gpu:2", "mem": "16G", "runtime": "3:00:00"}},
        {"at": NOW, "job_end": NOW + timedelta(hours=1), "resources": {"cpus": 2}},
        {"at": NOW, "user_options": {}},  # nothing known
    ]
    r = reclaimed(stops)
    assert r == {"cpu_hours": 10.0, "gpu_hours": 4.0, "mem_gb_hours": 32.0, "counted": 2, "unknown": 1}
