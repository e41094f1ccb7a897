"""Shared fixtures of the web tests (import them: `from tests.web import make_web, web`).

A started web app (real tornado server on 127.0.0.1, the real login (reaper.web.login), real
SQLite store, real Sweeper) with a scripted hub (tests/fakes.py FakeHub, whose ``identities`` answer
who holds a token, as GET /hub/api/user would), so cookies, xsrf and authorization run the real
code."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from tornado.httpserver import HTTPServer
from tornado.web import create_signed_value

from reaper.config import parse_settings
from reaper.core.model import HubServer, Kernel, Probe
from reaper.metrics import Metrics
from reaper.notify.outbox import LogChannel, Outbox
from reaper.store import Store
from reaper.sweep import Sweeper, SweepResult
from reaper.web.app import make_app
from reaper.web.login import HubLogin
from tests.fakes import FakeHub
from tests.harness.hub import free_ports

PREFIX = "/services/reaper/"
SECRET = b"x" * 32
POLICY = """
sweep_every: 5m
hub: {timezone: America/Montreal}
defaults:
  detached: {warn_after: 1h, stop_after: 3h}
  attached: {warn_after: 8h, stop_after: 24h}
  min_notice: 30m
  channels: [log]
"""

ACCESS = "access:services!service=reaper"
CLIENT_ID = "service-reaper"
HUB = "http://127.0.0.1:8000"
IDENTITIES: dict[str, dict[str, Any]] = {
    "tok-alice": {"kind": "user", "name": "alice", "admin": False, "groups": ["physics"], "scopes": [ACCESS]},
    "tok-bob": {"kind": "user", "name": "bob", "admin": False, "groups": [], "scopes": [ACCESS]},
    "tok-root": {"kind": "user", "name": "root", "admin": True, "groups": [], "scopes": ["access:services"]},
    "tok-carol": {"kind": "user", "name": "carol", "admin": False, "groups": ["reaper-admins"], "scopes": [ACCESS]},
    # the hub knows dave, but his token has no access to this service (another service's only)
    "tok-dave": {"kind": "user", "name": "dave", "admin": False, "groups": [],
                 "scopes": ["access:services!service=other"]},
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def attached_probe() -> Probe:
    now = utcnow()
    return Probe(ok=True, status_last_activity=now, kernels=(Kernel("k", "python3", "idle", 1, now),))


def hub_server(user: str, name: str = "", *, started: datetime | None = None, **kw: Any) -> HubServer:
    return HubServer(user=user, name=name, started=started or utcnow() - timedelta(hours=5),
                     last_activity=utcnow(), url=f"/user/{user}/", target="http://127.0.0.1:1",
                     state={"job_id": kw.pop("job_id", "7")}, **kw)


@dataclass
class Service:
    """The attributes of reaper.service.ReaperService the page uses."""

    settings: Any
    store: Any
    hub: Any
    sweeper: Any
    outbox: Any = None
    last_result: SweepResult | None = None


@dataclass
class Web:
    base: str
    service: Service
    hub: FakeHub
    store: Store
    metrics: Metrics
    login: HubLogin
    client: httpx.AsyncClient
    ctx: Any  # reaper.web.context.WebContext of the running app
    cookies: dict[str, dict[str, str]] = field(default_factory=dict)

    def url(self, path: str = "") -> str:
        return self.base + PREFIX + path

    def cookie_header(self, who: str | None) -> dict[str, str]:
        jar = dict(self.cookies.get(who or "", {}))
        if who:
            jar[self.login.cookie_name] = create_signed_value(SECRET, self.login.cookie_name, f"tok-{who}").decode()
        return {"Cookie": "; ".join(f"{k}={v}" for k, v in jar.items())} if jar else {}

    async def get(self, path: str, who: str | None, **kw: Any) -> httpx.Response:
        headers = {**self.cookie_header(who), **kw.pop("headers", {})}
        r = await self.client.get(self.url(path), headers=headers, **kw)
        m = re.search(r'_xsrf="?([^";]+)', r.headers.get("set-cookie", ""))
        if m and who:
            self.cookies.setdefault(who, {})["_xsrf"] = m.group(1)
        return r

    async def xsrf(self, who: str) -> str:
        r = await self.get("", who)
        assert r.status_code == 200, r.text
        m = re.search(r'name="_xsrf" value="([^"]+)"', r.text)
        assert m, "the page has no xsrf field"
        return m.group(1)

    async def post(self, path: str, who: str | None, data: dict[str, str], *, xsrf: bool = True,
                   **kw: Any) -> httpx.Response:
        if xsrf and who:
            data = {**data, "_xsrf": await self.xsrf(who)}
        headers = {**self.cookie_header(who), **kw.pop("headers", {})}
        return await self.client.post(self.url(path), data=data, headers=headers, **kw)


def settings(extra: str = "") -> Any:
    return parse_settings(POLICY + extra, env={})


@pytest.fixture
async def make_web(tmp_path):
    made: list[tuple[HTTPServer, httpx.AsyncClient, Store]] = []

    async def make(extra: str = "", servers: list[HubServer] | None = None, *, sweep: bool = True) -> Web:
        st = settings(extra)
        store = Store.open(f"sqlite:///{tmp_path / 'reaper.sqlite'}")
        hub = FakeHub(identities={k: dict(v) for k, v in IDENTITIES.items()})
        for s in servers if servers is not None else [hub_server("alice"), hub_server("bob")]:
            hub.add(s, attached_probe())
        sweeper = Sweeper(st, hub, store, notifier=Outbox(store, {"log": LogChannel()}))
        service = Service(settings=st, store=store, hub=hub, sweeper=sweeper)
        if sweep:
            service.last_result = await sweeper.run_once()
        login = HubLogin(hub, prefix=PREFIX, client_id=CLIENT_ID, authorize_url="/hub/api/oauth2/authorize",
                         redirect_uri=f"{HUB}{PREFIX}oauth_callback", access_scopes={ACCESS})
        metrics = Metrics()
        app = make_app(service, prefix=PREFIX, login=login, metrics=metrics, cookie_secret=SECRET)
        port = free_ports(1)[0]
        server = HTTPServer(app)
        server.listen(port, address="127.0.0.1")
        client = httpx.AsyncClient(timeout=30, follow_redirects=False)
        made.append((server, client, store))
        return Web(f"http://127.0.0.1:{port}", service, hub, store, metrics, login, client,
                   app.settings["reaper_ctx"])

    yield make
    for server, client, store in made:
        server.stop()
        await client.aclose()
        store.close()


@pytest.fixture
async def web(make_web) -> Web:
    return await make_web()
