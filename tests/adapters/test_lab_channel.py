"""The "lab" channel (reaper/notify/lab.py) against a fake hub and fake companions over real HTTP.

Stand-ins started: one aiohttp server on 127.0.0.1 playing the hub's ``GET /hub/api/proxy`` (the route
table the hub client reads a server's own address from) and the single-user servers' companion
``api/reaper/notice``; the reaper's real HubClient (aiohttp transport, direct probes) reaches them. A
sweep with a real SQLite store and the real outbox proves the sweep's hook: the notice is PUT when
queued and DELETEd when its spell ends, and a keep pressed in JupyterLab is recorded.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from reaper.config import parse_settings
from reaper.core.model import HubServer, Kernel, NoticeKind, Probe, RunKey
from reaper.hub import HubClient, HubOptions, ProbeOptions
from reaper.notify.channels import build_channels
from reaper.notify.lab import LabChannel
from reaper.notify.outbox import DeliveryError, Outbox
from reaper.store import Store
from reaper.store.context import NoticeContext
from reaper.store.outbox import Delivery
from reaper.sweep import Sweeper
from tests.fakes import Clock, FakeHub

TOKEN = "service-token-0123456789abcdef"
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
M = timedelta(minutes=1)
STARTED = T0 - timedelta(hours=5)


@dataclass
class Site:
    """The fake hub and companions: what each server answers and every request they got."""

    url: str = ""
    answers: dict[str, int] = field(default_factory=dict)  # user -> status of their companion (200 default)
    notices: dict[str, Any] = field(default_factory=dict)  # user -> the pending notice
    kept: dict[str, str] = field(default_factory=dict)  # user -> kept_at
    requests: list[tuple[str, str, str, str, Any]] = field(default_factory=list)  # method, path, query, auth, body


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    s = Site()

    async def proxy(request: web.Request) -> web.Response:
        routes = {f"/user/{u}/": {"target": s.url, "data": {"user": u, "server_name": ""}}
                  for u in ("alice", "bob", "carol")}
        return web.json_response({"items": routes, "_pagination": {"offset": 0, "limit": 200, "total": 3,
                                                                     "next": None}})

    async def notice(request: web.Request) -> web.Response:
        user = request.match_info["user"]
        body = await request.json() if request.can_read_body else None
        s.requests.append((request.method, request.path, request.query_string,
                           request.headers.get("Authorization", ""), body))
        status = s.answers.get(user, 200)
        if status != 200:
            return web.json_response({"message": "nope"}, status=status)
        if request.method == "PUT":
            s.notices[user] = body
            return web.json_response({"notice": body})
        cleared = {"cleared": s.notices.pop(user, None), "kept_at": s.kept.pop(user, None)}
        return web.json_response(cleared)

    app = web.Application()
    app.router.add_get("/hub/api/proxy", proxy)
    app.router.add_route("*", "/user/{user}/api/reaper/notice", notice)
    runner = web.AppRunner(app)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    port = tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    s.url = f"http://127.0.0.1:{port}"
    try:
        yield s
    finally:
        await runner.cleanup()


@pytest.fixture
async def hub(site: Site) -> AsyncIterator[HubClient]:
    async with HubClient(site.url + "/hub/api", TOKEN, HubOptions(backoff=0, retries=0),
                         ProbeOptions(timeout=5)) as client:
        yield client


SETTINGS = parse_settings("hub: {name: Test Hub}\ndefaults: {channels: [log, lab]}\n", env={})


def delivery(user: str, kind: NoticeKind = NoticeKind.WARNING, *, nid: int = 41, **ctx: Any) -> Delivery:
    run = RunKey(user, "", STARTED)
    context = NoticeContext(user=user, url=f"/user/{user}/", reason="window closed 2h ago",
                            stop_at=T0 + timedelta(hours=1), **ctx)
    return Delivery(id=nid * 10, notice_id=nid, run=run, kind=kind, channel="lab", attempts=0, context=context)


async def test_a_notice_is_put_to_the_servers_own_address_untracked_with_the_service_token(site, hub):
    lab = LabChannel(SETTINGS, hub=hub)
    await lab.deliver(delivery("alice", job_end=T0 + timedelta(minutes=40)))
    (method, path, query, auth, body), = site.requests
    assert (method, path, query, auth) == ("PUT", "/user/alice/api/reaper/notice", "no_track_activity=1",
                                           f"token {TOKEN}")
    assert body == {"id": "41", "kind": "warning", "stop_at": "2026-11-25T13:00:00Z",
                    "walltime_end": "2026-11-25T12:40:00Z", "reason": "window closed 2h ago", "hub": "Test Hub",
                    "server": ""}


async def test_stopped_and_orphan_notices_are_not_shown(site, hub):
    lab = LabChannel(SETTINGS, hub=hub)
    await lab.deliver(delivery("alice", NoticeKind.STOPPED))
    await lab.deliver(delivery("alice", NoticeKind.ORPHAN))
    assert site.requests == []


async def test_a_server_without_the_companion_fails_quietly_once_and_is_not_asked_again(site, hub, caplog):
    site.answers["bob"] = 404
    lab = LabChannel(SETTINGS, hub=hub)
    caplog.set_level(logging.INFO, "reaper.notify.lab")
    for nid in (1, 2, 3):
        with pytest.raises(DeliveryError) as e:
            await lab.deliver(delivery("bob", nid=nid))
        assert e.value.permanent and e.value.quiet
    assert len(site.requests) == 1
    assert sum("no companion" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(("status", "permanent"), [(403, True), (400, True), (500, False), (503, False)])
async def test_refusals_are_permanent_and_server_errors_are_retried(site, hub, status, permanent):
    site.answers["carol"] = status
    with pytest.raises(DeliveryError) as e:
        await LabChannel(SETTINGS, hub=hub).deliver(delivery("carol"))
    assert e.value.permanent is permanent and not e.value.quiet


async def test_an_unreachable_server_is_a_temporary_failure(hub):
    lab = LabChannel(SETTINGS, hub=hub)
    d = delivery("dave", spawner_state={"server_url": "http://127.0.0.1:1"})  # nothing listens there
    with pytest.raises(DeliveryError) as e:
        await lab.deliver(d)
    assert not e.value.permanent


def test_the_channels_always_include_lab():
    assert isinstance(build_channels(SETTINGS)["lab"], LabChannel)


# -- the sweep's hook: the spell ends, the notice leaves JupyterLab -------------------------------------

POLICY = """
hub: {name: Test Hub}
sweep_every: 5m
probe: {skip_fresh: false}
defaults:
  detached: {warn_after: 1h, stop_after: 3h}
  remind_every: 1h
  min_notice: 30m
  channels: [log, lab]
"""


def detached(since: datetime) -> Probe:
    return Probe(ok=True, status_last_activity=since, kernels=(Kernel("k", "python3", "idle", 0, since),))


@pytest.fixture
def store(tmp_path):
    s = Store.open(f"sqlite:///{tmp_path / 'reaper.sqlite'}")
    yield s
    s.close()


async def test_a_sweep_shows_the_warning_then_clears_it_when_the_user_is_back_and_records_the_lab_keep(
        site, hub, store):
    settings = parse_settings(POLICY, env={})
    fake, clock = FakeHub(), Clock(T0)
    srv = HubServer(user="alice", name="", started=STARTED, last_activity=T0 - 70 * M, url="/user/alice/")
    fake.add(srv, detached(T0 - 70 * M))
    channels = build_channels(settings, store=store, hub=hub)
    sw = Sweeper(settings, fake, store, notifier=Outbox(store, channels), clock=clock)

    await sw.run_once()  # 70 min detached: the warning, shown in JupyterLab
    assert [r[0] for r in site.requests] == ["PUT"] and site.notices["alice"]["kind"] == "warning"

    clock.advance(5 * M)  # the same spell: nothing more
    await sw.run_once()
    assert [r[0] for r in site.requests] == ["PUT"]

    # the user pressed Keep running in JupyterLab: fresh activity on the server
    site.kept["alice"] = (T0 + 6 * M).isoformat()
    fake.add(srv, detached(T0 + 6 * M))
    clock.advance(5 * M)
    await sw.run_once()
    assert [r[0] for r in site.requests] == ["PUT", "DELETE"] and "alice" not in site.notices
    actions = [(a.kind, a.actor, a.detail) for a in store.reports.recent_actions(T0 - timedelta(days=1))]
    assert ("keep", "alice", f"kept from JupyterLab at {(T0 + 6 * M).isoformat()}") in actions

    clock.advance(5 * M)  # the new spell goes on: cleared once only
    await sw.run_once()
    assert [r[0] for r in site.requests] == ["PUT", "DELETE"]


async def test_a_dry_run_and_an_unreachable_look_clear_nothing(site, hub, store):
    settings = parse_settings(POLICY, env={})
    fake, clock = FakeHub(), Clock(T0)
    srv = HubServer(user="alice", name="", started=STARTED, last_activity=T0 - 70 * M, url="/user/alice/")
    fake.add(srv, detached(T0 - 70 * M))
    sw = Sweeper(settings, fake, store, notifier=Outbox(store, build_channels(settings, store=store, hub=hub)),
                 clock=clock)
    await sw.run_once()
    fake.add(srv, detached(T0 + 2 * M))
    clock.advance(5 * M)
    await sw.run_once(dry_run=True)
    fake.add(srv, Probe.failed("status: timeout after 5s"))
    clock.advance(5 * M)
    await sw.run_once()
    assert [r[0] for r in site.requests] == ["PUT"]


async def test_a_keep_from_the_page_or_a_keep_link_clears_the_notice_in_jupyterlab_once(site, hub, store):
    """The spell goes on (nobody touched the server), but the warning's stop no longer holds."""
    settings = parse_settings(POLICY, env={})
    fake, clock = FakeHub(), Clock(T0)
    srv = HubServer(user="alice", name="", started=STARTED, last_activity=T0 - 70 * M, url="/user/alice/")
    fake.add(srv, detached(T0 - 70 * M))
    sw = Sweeper(settings, fake, store, notifier=Outbox(store, build_channels(settings, store=store, hub=hub)),
                 clock=clock)
    await sw.run_once()
    assert [r[0] for r in site.requests] == ["PUT"]
    run = srv.run_key()
    assert run is not None
    store.runs.set_kept_until(run, T0 + timedelta(hours=3), by="alice (keep link)", now=T0 + M)
    clock.advance(5 * M)
    await sw.run_once()
    assert [r[0] for r in site.requests] == ["PUT", "DELETE"] and "alice" not in site.notices
    clock.advance(5 * M)
    await sw.run_once()  # still kept: cleared once only
    assert [r[0] for r in site.requests] == ["PUT", "DELETE"]


def test_a_keep_leaves_a_walltime_notice_shown():
    from reaper.core.model import History, Observation, SentNotice, State
    from reaper.notify.lab import notice_to_clear

    srv = HubServer(user="alice", name="", started=STARTED, last_activity=T0 - 70 * M, url="/user/alice/")
    obs = Observation(server=srv, state=State.DETACHED, at=T0, last_activity=T0 - 70 * M,
                      detached_since=T0 - 70 * M)
    spell = T0 - 70 * M
    kept = T0 + timedelta(hours=2)
    wall = History(notices=(SentNotice(NoticeKind.WALLTIME, spell, T0 - M),), kept_until=kept)
    warn = History(notices=(SentNotice(NoticeKind.WARNING, spell, T0 - M),), kept_until=kept)
    assert notice_to_clear(obs, wall, T0) is None
    assert notice_to_clear(obs, warn, T0) is not None
    assert notice_to_clear(obs, warn, kept + M) is None  # the keep is over: the notice stands
