"""Shared fixtures of the web tests (import them: `from tests.web import make_web, web`).

A started web app (real tornado server on 127.0.0.1, the real login: JupyterHub's HubOAuth as
reaper.web.auth configures it, real SQLite store, real Sweeper) with a scripted hub (tests/fakes.py
FakeHub). The login reaches the hub over HTTP, as in production: :class:`HubAPI` serves FakeHub's
``identities`` at GET /hub/api/user and its code trade at POST /hub/api/oauth2/token, on a port of
its own, so cookies, xsrf, scopes and authorization run JupyterHub's code and ours."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from jupyterhub.services.auth import HubOAuth
from tornado.httpserver import HTTPServer
from tornado.web import Application, RequestHandler, create_signed_value

from reaper.config import parse_settings
from reaper.core.model import HubServer, Kernel, Probe
from reaper.hub import HubError
from reaper.metrics import Metrics
from reaper.notify.outbox import LogChannel, Outbox
from reaper.store import Store
from reaper.sweep import Sweeper, SweepResult
from reaper.web.app import make_app
from reaper.web.auth import hub_oauth
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
    hub_auth: HubOAuth
    client: httpx.AsyncClient
    ctx: Any  # reaper.web.context.WebContext of the running app
    cookies: dict[str, dict[str, str]] = field(default_factory=dict)

    def url(self, path: str = "") -> str:
        return self.base + PREFIX + path

    def cookie_header(self, who: str | None) -> dict[str, str]:
        jar = dict(self.cookies.get(who or "", {}))
        if who:
            name = self.hub_auth.cookie_name
            jar[name] = create_signed_value(SECRET, name, f"tok-{who}").decode()
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


class _HubUser(RequestHandler):
    """GET /hub/api/user as the hub answers it: the model of whoever holds the request's token, 403
    for a token it does not know."""

    def initialize(self, hub: FakeHub) -> None:
        self.hub = hub

    def check_xsrf_cookie(self) -> None:  # an API, called with tokens
        return None

    async def get(self) -> None:
        token = self.request.headers.get("Authorization", "").partition(" ")[2]
        try:
            model = await self.hub.identify(token)
        except HubError:
            self.set_status(503)
            return self.finish({"status": 503, "message": "hub down"})
        if model is None:
            self.set_status(403)
            return self.finish({"status": 403, "message": "no such token"})
        self.finish(model)


class _HubToken(_HubUser):
    """POST /hub/api/oauth2/token: FakeHub.oauth_token checks the code as the hub does."""

    async def post(self) -> None:
        form = {k: self.get_body_argument(k, "") for k in
                ("client_id", "client_secret", "grant_type", "code", "redirect_uri", "code_verifier")}
        self.hub.token_forms.append(form)  # type: ignore[attr-defined]
        try:
            if form["client_secret"] != SERVICE_TOKEN or form["grant_type"] != "authorization_code":
                raise HubError("bad client", status=400)
            token = await self.hub.oauth_token(client_id=form["client_id"], code=form["code"],
                                               redirect_uri=form["redirect_uri"], code_verifier=form["code_verifier"])
        except HubError as e:
            self.set_status(400 if getattr(e, "status", None) == 400 else 503)
            return self.finish({"error": "invalid_grant"})
        self.finish({"access_token": token, "token_type": "Bearer"})


SERVICE_TOKEN = "service-token"


def settings(extra: str = "") -> Any:
    return parse_settings(POLICY + extra, env={})


@pytest.fixture
async def make_web(tmp_path):
    made: list[tuple[HTTPServer, httpx.AsyncClient, Store]] = []
    apis: list[HTTPServer] = []
    from jupyterhub.httpclient import JupyterHubHTTPClient

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
        hub.token_forms = []  # type: ignore[attr-defined]
        api_port, port = free_ports(2)
        api = HTTPServer(Application([("/hub/api/user", _HubUser, {"hub": hub}),
                                      ("/hub/api/oauth2/token", _HubToken, {"hub": hub})]))
        api.listen(api_port, address="127.0.0.1")
        env = {"JUPYTERHUB_CLIENT_ID": CLIENT_ID, "JUPYTERHUB_SERVICE_NAME": "reaper",
               "JUPYTERHUB_OAUTH_CALLBACK_URL": f"{HUB}{PREFIX}oauth_callback",
               "JUPYTERHUB_OAUTH_ACCESS_SCOPES": f'["{ACCESS}"]'}
        hub_auth = hub_oauth(api_url=f"http://127.0.0.1:{api_port}/hub/api", api_token=SERVICE_TOKEN,
                             prefix=PREFIX, env=env)
        metrics = Metrics()
        app = make_app(service, prefix=PREFIX, hub_auth=hub_auth, metrics=metrics, cookie_secret=SECRET)
        server = HTTPServer(app)
        server.listen(port, address="127.0.0.1")
        client = httpx.AsyncClient(timeout=30, follow_redirects=False)
        made.append((server, client, store))
        apis.append(api)
        return Web(f"http://127.0.0.1:{port}", service, hub, store, metrics, hub_auth, client,
                   app.settings["reaper_ctx"])

    yield make
    for server, client, store in made:
        server.stop()
        await client.aclose()
        store.close()
    for api in apis:
        api.stop()
    await JupyterHubHTTPClient.loop_instance().close()  # HubOAuth's connections, of this test's loop


@pytest.fixture
async def web(make_web) -> Web:
    return await make_web()
