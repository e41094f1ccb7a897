"""A loopback simulator of a JupyterHub 6 hub, its proxy and its single-user servers.

It answers the REST calls a reaper or jupyterhub-idle-culler makes, with the shapes captured from
JupyterHub 6.1.1 + batchspawner 1.3.0 + jupyter_server 2.21 (/work/shared/fixtures), and four knobs:

(a) ``hub_latency``: the hub is single-threaded, so hub API requests are served ONE AT A TIME: each
    holds one lock for ``hub_latency`` seconds plus the work of building its answer.
(b) ``user_latency``: each single-user server answers after ``user_latency`` seconds, concurrently.
(c) ``stop_time``: the spawner's stop. ``DELETE .../server`` holds the hub lock only for its own
    latency, then waits ``min(stop_time, slow_stop_timeout)``: 204 if the stop finished, else 202
    (the server is then ``pending: "stop"`` until it finishes in the background).
(d) the population: N users, a share of them with a named server too, and shares of servers that
    are ``active``, ``idle_attached`` (hidden tab), ``idle_detached`` (window closed) or
    ``computing`` (busy kernel, silent). Deterministic for a seed.

Listeners (all on 127.0.0.1):

* the *public* port: the hub API under ``/hub/api`` and the single-user APIs under
  ``/user/NAME/[SERVER/]api/...`` *through the proxy* (every request through the proxy counts as
  activity, as configurable-http-proxy records it);
* the *direct* ports: each server's own address (the proxy route's ``target``); a request there
  counts as activity unless it carries ``?no_track_activity=1`` (``/api/status`` never counts), as
  jupyter_server 2.21 does. By default every server gets its own port, as separate Slurm jobs have,
  so a client cannot reuse one keep-alive connection across servers.

Activity a request creates is copied to the hub's ``last_activity`` at once (the real hub learns it
within its activity interval): the simulator is pessimistic about probes that forget the flag.

Counters: requests by ``<listener> <METHOD> <route template>``, a log of stops (request arrival,
answer, completion) and the number of activity-creating requests. ``GET /sim/stats`` returns them,
``POST /sim/reset`` clears them (``?repopulate=1`` also restores the initial population); in process,
use :meth:`HubSim.stats` and :meth:`HubSim.reset`.

Standalone: ``python -m benchmarks.hubsim --users 1000 --hub-latency 0.005 --stop-time 1`` prints one
JSON line with the URLs and the token, then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import secrets
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode

from aiohttp import web

HUB_VERSION = "6.1.1"
PAGINATION_MEDIA_TYPE = "application/jupyterhub-pagination+json"
PAGE_DEFAULT = 50  # api_page_default_limit
PAGE_MAX = 200  # api_page_max_limit
SLOW_STOP_TIMEOUT = 10.0  # JupyterHub.slow_stop_timeout
CATEGORIES = ("active", "idle_attached", "idle_detached", "computing")
HOST = "127.0.0.1"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utcnow() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------------------------- data


@dataclass
class Population:
    """Who runs what. Shares are normalised; every server gets exactly one category."""

    users: int = 100
    named_share: float = 0.0  # share of users that also run a named server ("gpu")
    active: float = 0.0
    idle_attached: float = 0.0
    idle_detached: float = 1.0
    computing: float = 0.0
    idle_hours: tuple[float, float] = (2.0, 8.0)  # how long stale categories have been quiet
    seed: int = 1
    staff: bool = True  # every other user in group "staff" (the shipped config exempts staff); False: none
    server_url_in_state: bool = False  # our shipped spawner puts its address in its state

    def shares(self) -> dict[str, float]:
        raw = {c: max(float(getattr(self, c)), 0.0) for c in CATEGORIES}
        total = sum(raw.values())
        if total <= 0:
            raise ValueError("at least one category share must be positive")
        return {c: v / total for c, v in raw.items()}

    def n_servers(self) -> int:
        return self.users + len(self.named_users())

    def named_users(self) -> set[int]:
        rng = random.Random(f"{self.seed}-named")
        k = round(self.users * min(max(self.named_share, 0.0), 1.0))
        return set(rng.sample(range(self.users), k))


@dataclass
class Kernel:
    id: str
    execution_state: str
    connections: int
    last_activity: datetime | None  # None: live (tracks the server's live offset)


@dataclass
class SimServer:
    user: str
    name: str
    category: str
    started: datetime
    job_id: str
    port: int
    # Stored times; a *_fresh offset (seconds) makes the value live: now - offset at request time.
    hub_last_activity: datetime
    su_last_activity: datetime
    hub_fresh: float | None = None
    su_fresh: float | None = None
    kernels: list[Kernel] = field(default_factory=list)
    pending: str | None = None
    user_options: dict[str, Any] = field(default_factory=dict)
    url_in_state: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.user, self.name)

    @property
    def url(self) -> str:
        return f"/user/{self.user}/{self.name}/" if self.name else f"/user/{self.user}/"

    @property
    def target(self) -> str:
        return f"http://{HOST}:{self.port}"

    def hub_activity(self, now: datetime) -> datetime:
        if self.hub_fresh is not None:
            return max(self.hub_last_activity, now - timedelta(seconds=self.hub_fresh))
        return self.hub_last_activity

    def su_activity(self, now: datetime) -> datetime:
        if self.su_fresh is not None:
            return max(self.su_last_activity, now - timedelta(seconds=self.su_fresh))
        return self.su_last_activity

    def touch(self, now: datetime) -> None:
        """A request that counts as activity (no no_track_activity, or through the proxy)."""
        self.su_last_activity = now
        self.hub_last_activity = max(self.hub_last_activity, now)

    def kernel_models(self, now: datetime) -> list[dict[str, Any]]:
        return [
            {
                "id": k.id,
                "name": "python3",
                "last_activity": iso(
                    k.last_activity if k.last_activity is not None else self.su_activity(now)
                ),
                "execution_state": k.execution_state,
                "connections": k.connections,
            }
            for k in self.kernels
        ]

    def status_model(self, now: datetime) -> dict[str, Any]:
        return {
            "connections": sum(k.connections for k in self.kernels),
            "kernels": len(self.kernels),
            "last_activity": iso(self.su_activity(now)),
            "started": iso(self.started),
        }

    def hub_model(self, now: datetime, with_state: bool) -> dict[str, Any]:
        model: dict[str, Any] = {
            "name": self.name,
            "display_name": self.name,
            "full_name": f"{self.user}/{self.name}",
            "last_activity": iso(self.hub_activity(now)),
            "started": iso(self.started),
            "pending": self.pending,
            "ready": self.pending is None,
            "stopped": False,
            "url": self.url,
            "user_options": dict(self.user_options),
            "progress_url": (
                f"/hub/api/users/{self.user}/servers/{self.name}/progress"
                if self.name
                else f"/hub/api/users/{self.user}/server/progress"
            ),
            "full_url": None,
            "full_progress_url": None,
        }
        if with_state:
            state: dict[str, Any] = {
                "job_id": self.job_id,
                "job_status": f"RUNNING node{int(self.job_id) % 64:02d}",
            }
            if self.url_in_state:
                state["server_url"] = self.target
            model["state"] = state
        return model


@dataclass
class SimUser:
    id: int
    name: str
    created: datetime
    servers: dict[str, SimServer] = field(default_factory=dict)
    named: set[str] = field(default_factory=set)  # named servers the hub knows (running or not)
    groups: list[str] = field(default_factory=list)

    def model(self, now: datetime, with_state: bool = True) -> dict[str, Any]:
        acts = [s.hub_activity(now) for s in self.servers.values()]
        default = self.servers.get("")
        return {
            "name": self.name,
            "admin": False,
            "server": default.url if default is not None and default.pending is None else None,
            "groups": list(self.groups),
            "roles": ["user"],
            "kind": "user",
            "pending": default.pending if default is not None else None,
            "created": iso(self.created),
            "last_activity": iso(max(acts)) if acts else iso(self.created),
            "auth_state": None,
            "servers": {name: s.hub_model(now, with_state) for name, s in self.servers.items()},
            "user_info": None,
        }


@dataclass
class StopRecord:
    user: str
    server: str
    requested: float  # time.time() when the DELETE arrived
    category: str = ""  # the stopped server's category (stopping active/computing ones is harm)
    answered: float | None = None
    completed: float | None = None
    status: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "server": self.server,
            "requested": self.requested,
            "answered": self.answered,
            "completed": self.completed,
            "status": self.status,
            "category": self.category,
        }


def build_users(pop: Population, ports: list[int], now: datetime) -> dict[str, SimUser]:
    """The initial population, deterministic for (population, ports)."""
    rng = random.Random(pop.seed)
    shares = pop.shares()
    named = pop.named_users()
    cats = list(shares)
    lo, hi = pop.idle_hours
    # exact quotas (largest remainder), shuffled: the counts are ground truth, not a draw
    total = pop.n_servers()
    exact = {c: shares[c] * total for c in cats}
    counts = {c: int(exact[c]) for c in cats}
    for c in sorted(cats, key=lambda c: exact[c] - counts[c], reverse=True)[: total - sum(counts.values())]:
        counts[c] += 1
    deck = [c for c in cats for _ in range(counts[c])]
    rng.shuffle(deck)
    users: dict[str, SimUser] = {}
    job = 1000
    idx = 0
    width = max(5, len(str(pop.users)))
    for i in range(pop.users):
        name = f"user{i:0{width}d}"
        created = now - timedelta(days=30, seconds=rng.uniform(0, 86400))
        groups = ["staff"] if pop.staff and not i % 2 else ["students"]
        user = SimUser(id=i + 1, name=name, created=created, groups=groups)
        for sname in ("", "gpu") if i in named else ("",):
            cat = deck[idx]
            started = now - timedelta(hours=rng.uniform(max(hi, 1.0), max(hi, 1.0) + 24))
            stale = now - timedelta(hours=rng.uniform(lo, hi))
            kid = str(uuid.UUID(int=rng.getrandbits(128)))
            port = ports[idx % len(ports)]
            idx += 1
            job += 1
            srv = SimServer(
                user=name,
                name=sname,
                category=cat,
                started=started,
                job_id=str(job),
                port=port,
                hub_last_activity=stale,
                su_last_activity=stale,
                user_options={"partition": "gpu" if sname else "cpu", "runtime": "8:00:00"},
            )
            if cat == "active":  # browser open and polling: everything fresh
                srv.hub_fresh = rng.uniform(0, 60)
                srv.su_fresh = rng.uniform(0, 10)
                srv.kernels = [Kernel(kid, "idle", 1, None)]
            elif cat == "idle_attached":  # hidden tab: websocket pings keep the hub fresh, status frozen
                srv.hub_fresh = rng.uniform(0, 300)
                srv.kernels = [Kernel(kid, "idle", 1, stale)]
            elif cat == "idle_detached":  # window closed
                srv.kernels = [Kernel(kid, "idle", 0, stale)]
            else:  # computing: busy and silent, timestamps frozen
                srv.kernels = [Kernel(kid, "busy", 0, stale)]
            srv.url_in_state = pop.server_url_in_state
            user.servers[sname] = srv
            if sname:
                user.named.add(sname)
        users[name] = user
    return users


# ---------------------------------------------------------------------------------------- server


class HubSim:
    """The simulator. ``await start()``, use ``api_url``/``token``, ``await close()``."""

    def __init__(
        self,
        population: Population,
        *,
        hub_latency: float = 0.005,
        user_latency: float = 0.0,
        stop_time: float = 0.0,
        token: str | None = None,
        slow_stop_timeout: float = SLOW_STOP_TIMEOUT,
        per_server_ports: bool = True,
        max_ports: int | None = None,
    ) -> None:
        self.population = population
        self.hub_latency = hub_latency
        self.user_latency = user_latency
        self.stop_time = stop_time
        self.slow_stop_timeout = slow_stop_timeout
        self.token = token or secrets.token_hex(16)
        self.per_server_ports = per_server_ports
        self.max_ports = max_ports
        self.users: dict[str, SimUser] = {}
        self.requests: Counter[str] = Counter()
        self.stops: list[StopRecord] = []
        self.activity_touches = 0
        self.hub_busy = 0.0  # seconds the hub lock was held
        self.started_at = time.time()
        self._hub_lock = asyncio.Lock()
        self._runners: list[web.AppRunner] = []
        self._ports: list[int] = []
        self._servers: list[asyncio.Server] = []
        self._owner: dict[int, set[tuple[str, str]]] = {}
        self._bg: set[asyncio.Task[None]] = set()
        self._public_port = 0
        self._version = 0
        self._active_cache: tuple[int, list[SimUser]] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The public root (proxy): hub API at url + '/hub/api', proxied servers at url + '/user/...'."""
        return f"http://{HOST}:{self._public_port}"

    @property
    def api_url(self) -> str:
        return self.url + "/hub/api"

    async def start(self, port: int = 0) -> None:
        public = web.Application(middlewares=[self._middleware("proxy")])
        self._add_hub_routes(public)
        self._add_user_routes(public, via_proxy=True)
        public.router.add_get("/sim/stats", self._h_stats)
        public.router.add_post("/sim/reset", self._h_reset)
        runner = web.AppRunner(public, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, HOST, port, backlog=1024)
        await site.start()
        self._runners.append(runner)
        self._public_port = _site_port(site)

        direct = web.Application(middlewares=[self._middleware("direct")])
        self._add_user_routes(direct, via_proxy=False)
        drunner = web.AppRunner(direct, access_log=None, handle_signals=False)
        await drunner.setup()
        self._runners.append(drunner)
        n_ports = self.population.n_servers() if self.per_server_ports else 1
        if self.max_ports is not None:
            n_ports = max(1, min(n_ports, self.max_ports))
        # one asyncio server per port (aiohttp's TCPSite bookkeeping is quadratic in the site count)
        loop = asyncio.get_running_loop()
        handler = drunner.server
        assert handler is not None
        for sock in _listen_many(n_ports):
            srv = await loop.create_server(handler, sock=sock, backlog=128)
            self._servers.append(srv)
            self._ports.append(sock.getsockname()[1])
        self._populate()

    async def close(self) -> None:
        for t in list(self._bg):
            t.cancel()
        for srv in self._servers:
            srv.close()
        self._servers.clear()
        for r in reversed(self._runners):
            await r.cleanup()
        self._runners.clear()

    async def __aenter__(self) -> HubSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _populate(self) -> None:
        for t in list(self._bg):
            t.cancel()
        self.users = build_users(self.population, self._ports, utcnow())
        self._owner = {}
        for u in self.users.values():
            for s in u.servers.values():
                self._owner.setdefault(s.port, set()).add(s.key)
        self._changed()

    def _changed(self) -> None:
        self._version += 1
        self._active_cache = None

    # -- counters ----------------------------------------------------------------------------

    def running(self) -> int:
        """Servers with a server record (running or stopping)."""
        return sum(len(u.servers) for u in self.users.values())

    def categories(self) -> dict[str, int]:
        c: Counter[str] = Counter()
        for u in self.users.values():
            for s in u.servers.values():
                c[s.category] += 1
        return dict(c)

    def stats(self) -> dict[str, Any]:
        done = [s for s in self.stops if s.completed is not None]
        return {
            "requests": dict(sorted(self.requests.items())),
            "requests_total": sum(self.requests.values()),
            "stops_requested": len(self.stops),
            "stops_completed": len(done),
            "stops_answered": Counter(str(s.status) for s in self.stops if s.status is not None),
            "first_stop_requested": min((s.requested for s in self.stops), default=None),
            "last_stop_completed": max((s.completed for s in done if s.completed), default=None),
            "stops": [s.as_dict() for s in self.stops],
            "activity_touches": self.activity_touches,
            "hub_busy_s": round(self.hub_busy, 4),
            "running": self.running(),
            "categories": self.categories(),
            "users": len(self.users),
            "direct_ports": len(self._ports),
        }

    def reset(self, repopulate: bool = False) -> None:
        self.requests.clear()
        self.stops.clear()
        self.activity_touches = 0
        self.hub_busy = 0.0
        self.started_at = time.time()
        if repopulate:
            self._populate()

    # -- middleware: counting and auth -------------------------------------------------------

    def _middleware(self, label: str) -> Any:
        token = self.token

        @web.middleware
        async def mw(request: web.Request, handler: Handler) -> web.StreamResponse:
            route = request.match_info.route
            resource = route.resource
            template = resource.canonical if resource is not None else "<unmatched>"
            if template.startswith("/sim/"):
                return await handler(request)
            where = "hub" if template.startswith("/hub/api") else label
            self.requests[f"{where} {request.method} {template}"] += 1
            if template != "/hub/api/" and template != "<unmatched>":
                auth = request.headers.get("Authorization", "")
                scheme, _, value = auth.partition(" ")
                if scheme.lower() not in ("token", "bearer") or not secrets.compare_digest(
                    value.strip(), token
                ):
                    return web.json_response({"status": 403, "message": "Forbidden"}, status=403)
            return await handler(request)

        return mw

    # -- hub API -----------------------------------------------------------------------------

    def _add_hub_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/hub/api/", self._h_root)
        r.add_get("/hub/api/users", self._h_users)
        r.add_get("/hub/api/users/{name}", self._h_user)
        r.add_delete("/hub/api/users/{name}/server", self._h_stop)
        r.add_delete("/hub/api/users/{name}/servers/{server}", self._h_stop)
        r.add_get("/hub/api/proxy", self._h_proxy)

    async def _hub(self, build: Callable[[], web.StreamResponse]) -> web.StreamResponse:
        """One request through the single-threaded hub: latency plus the work, under one lock."""
        async with self._hub_lock:
            t0 = time.perf_counter()
            if self.hub_latency > 0:
                await asyncio.sleep(self.hub_latency)
            try:
                return build()
            finally:
                self.hub_busy += time.perf_counter() - t0

    async def _h_root(self, request: web.Request) -> web.StreamResponse:
        return await self._hub(lambda: web.json_response({"version": HUB_VERSION}))

    @staticmethod
    def _pagination(request: web.Request) -> tuple[bool, int, int]:
        paginated = PAGINATION_MEDIA_TYPE in request.headers.get("Accept", "")
        default = PAGE_DEFAULT if paginated else PAGE_MAX
        try:
            offset = abs(int(request.query.get("offset", 0)))
            limit = abs(int(request.query.get("limit", default)))
        except ValueError:
            raise web.HTTPBadRequest(text="offset and limit must be integers") from None
        return paginated, offset, max(1, min(limit, PAGE_MAX))

    @staticmethod
    def _paginated_model(
        request: web.Request, items: Any, offset: int, limit: int, total: int
    ) -> dict[str, Any]:
        nxt: dict[str, Any] | None = None
        if offset + limit < total:
            query = dict(parse_qsl(request.url.query_string, keep_blank_values=True))
            query.update(offset=str(offset + limit), limit=str(limit))
            url = str(request.url.with_query(None)) + "?" + urlencode(query)
            nxt = {"offset": offset + limit, "limit": limit, "url": url}
        return {
            "items": items,
            "_pagination": {"offset": offset, "limit": limit, "total": total, "next": nxt},
        }

    def _active_users(self) -> list[SimUser]:
        if self._active_cache is None or self._active_cache[0] != self._version:
            self._active_cache = (self._version, [u for u in self.users.values() if u.servers])
        return self._active_cache[1]

    async def _h_users(self, request: web.Request) -> web.StreamResponse:
        paginated, offset, limit = self._pagination(request)
        state = request.query.get("state")
        if state not in (None, "", "active", "ready", "inactive"):
            raise web.HTTPBadRequest(text=f"Unrecognized state filter: {state!r}")

        def build() -> web.StreamResponse:
            now = utcnow()
            if state in ("active", "ready"):
                pool = self._active_users()
            elif state == "inactive":
                pool = [u for u in self.users.values() if not u.servers]
            else:
                pool = list(self.users.values())
            window = pool[offset : offset + limit]
            if state == "ready":  # post-filter, as the hub does: pages may come out short
                window = [u for u in window if any(s.pending is None for s in u.servers.values())]
            items = [u.model(now) for u in window]
            if paginated:
                return web.json_response(self._paginated_model(request, items, offset, limit, len(pool)))
            return web.json_response(items)

        return await self._hub(build)

    async def _h_user(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]

        def build() -> web.StreamResponse:
            user = self.users.get(name)
            if user is None:
                return web.json_response({"status": 404, "message": "Not Found"}, status=404)
            return web.json_response(user.model(utcnow()))

        return await self._hub(build)

    async def _h_stop(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        sname = request.match_info.get("server", "")
        rec = StopRecord(user=name, server=sname, requested=time.time())
        task: asyncio.Task[None] | None = None

        def begin() -> web.StreamResponse:
            nonlocal task
            user = self.users.get(name)
            if user is None:
                return web.json_response({"status": 404, "message": "Not Found"}, status=404)
            if sname and sname not in user.named:
                msg = f"{name} has no server named '{sname}'"
                return web.json_response({"status": 404, "message": msg}, status=404)
            srv = user.servers.get(sname)
            if srv is None:  # known but not running: the hub answers 204 and does nothing
                return web.Response(status=204)
            if srv.pending == "stop":
                return web.Response(status=202, text="")
            rec.category = srv.category
            self.stops.append(rec)
            srv.pending = "stop"  # the route goes first, then the spawner stops
            self._changed()
            if self.stop_time <= 0:
                self._finish_stop(srv, rec)
                return web.Response(status=204)
            task = asyncio.create_task(self._stop_later(srv, rec))
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)
            return web.Response(status=202)  # replaced below once the wait is over

        resp = await self._hub(begin)
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=self.slow_stop_timeout)
                resp = web.Response(status=204)
            except TimeoutError:
                resp = web.Response(status=202)
        rec.answered = time.time()  # only logged when this DELETE began a stop
        rec.status = resp.status
        return resp

    async def _stop_later(self, srv: SimServer, rec: StopRecord) -> None:
        await asyncio.sleep(self.stop_time)
        self._finish_stop(srv, rec)

    def _finish_stop(self, srv: SimServer, rec: StopRecord) -> None:
        user = self.users.get(srv.user)
        if user is not None and user.servers.get(srv.name) is srv:
            del user.servers[srv.name]
        rec.completed = time.time()
        self._changed()

    def _routes(self) -> dict[str, dict[str, Any]]:
        """The whole routing table, as configurable-http-proxy returns it (rebuilt per request)."""
        now = utcnow()
        table: dict[str, dict[str, Any]] = {
            "/": {"routespec": "/", "target": f"http://{HOST}:{self._public_port}", "data": {"hub": True}}
        }
        for u in self.users.values():
            for s in u.servers.values():
                if s.pending == "stop":
                    continue
                table[s.url] = {
                    "routespec": s.url,
                    "target": s.target,
                    "data": {
                        "user": s.user,
                        "server_name": s.name,
                        "last_activity": iso(s.hub_activity(now)),
                    },
                }
        # the hub fetches it from the proxy over HTTP and parses it: pay for that too
        routes: dict[str, dict[str, Any]] = json.loads(json.dumps(table))
        return routes

    async def _h_proxy(self, request: web.Request) -> web.StreamResponse:
        paginated, offset, limit = self._pagination(request)

        def build() -> web.StreamResponse:
            all_routes = self._routes()
            if offset == 0 and len(all_routes) < limit:
                routes = all_routes
            else:
                keys = sorted(all_routes)[offset : offset + limit]
                routes = {k: all_routes[k] for k in keys}
            if paginated:
                return web.json_response(
                    self._paginated_model(request, routes, offset, limit, len(all_routes))
                )
            return web.json_response(routes)

        return await self._hub(build)

    # -- single-user servers -----------------------------------------------------------------

    def _add_user_routes(self, app: web.Application, *, via_proxy: bool) -> None:
        for api in ("status", "kernels", "terminals", "sessions"):
            for prefix in ("/user/{name}", "/user/{name}/{server}"):
                app.router.add_get(f"{prefix}/api/{api}", self._user_handler(api, via_proxy))

    def _user_handler(self, api: str, via_proxy: bool) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            sname = request.match_info.get("server", "")
            user = self.users.get(name)
            srv = user.servers.get(sname) if user is not None else None
            if srv is None or srv.pending == "stop":
                # through the proxy: no route -> the hub's 503/404 page; direct: nobody listens there
                return web.json_response({"message": "no such server"}, status=503 if via_proxy else 404)
            if not via_proxy:
                sock = request.transport.get_extra_info("sockname") if request.transport else None
                if sock is None or (name, sname) not in self._owner.get(sock[1], set()):
                    return web.json_response({"message": "wrong server for this port"}, status=404)
            if self.user_latency > 0:
                await asyncio.sleep(self.user_latency)
            now = utcnow()
            untracked = request.query.get("no_track_activity") not in (None, "", "0", "false")
            if via_proxy or (api != "status" and not untracked):
                srv.touch(now)
                self.activity_touches += 1
            body: Any
            if api == "status":
                body = srv.status_model(now)
            elif api == "kernels":
                body = srv.kernel_models(now)
            elif api == "terminals":
                body = []
            else:
                body = [
                    {
                        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, k["id"])),
                        "path": f"work/notebook-{i}.ipynb",
                        "name": f"notebook-{i}.ipynb",
                        "type": "notebook",
                        "kernel": k,
                        "notebook": {"path": f"work/notebook-{i}.ipynb", "name": f"notebook-{i}.ipynb"},
                    }
                    for i, k in enumerate(srv.kernel_models(now))
                ]
            return web.json_response(body)

        return handle

    # -- control -----------------------------------------------------------------------------

    async def _h_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats())

    async def _h_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset(repopulate=request.query.get("repopulate") in ("1", "true", "yes"))
        return web.json_response(self.stats())


def _site_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp keeps the asyncio server here
    assert server is not None and getattr(server, "sockets", None)
    port: int = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return port


def _listen_many(n: int) -> list[socket.socket]:
    """n listening sockets on 127.0.0.1. Explicit ports below the ephemeral range: binding thousands
    of sockets to port 0 makes the kernel search longer and longer (seconds for 10k)."""
    if n <= 16:
        out = []
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            s.listen(128)
            s.setblocking(False)
            out.append(s)
        return out
    socks: list[socket.socket] = []
    port = random.randrange(10000, 20000)
    for _ in range(40000):
        if len(socks) >= n:
            break
        if port >= 32768:
            port = 1025
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((HOST, port))
        except OSError:
            s.close()
        else:
            s.listen(128)
            s.setblocking(False)
            socks.append(s)
        port += 1
    if len(socks) < n:
        for s in socks:
            s.close()
        raise OSError(f"could not bind {n} ports on {HOST}")
    return socks


def raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ----------------------------------------------------------------------------------------- CLI


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hubsim", description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--named-share", type=float, default=0.0, help="share of users with a named server too")
    p.add_argument("--active", type=float, default=0.0)
    p.add_argument("--idle-attached", type=float, default=0.0)
    p.add_argument("--idle-detached", type=float, default=1.0)
    p.add_argument("--computing", type=float, default=0.0)
    p.add_argument("--idle-hours", type=float, nargs=2, default=(2.0, 8.0), metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-staff", action="store_true", help="no user in group staff (default: every other one)")
    p.add_argument("--hub-latency", type=float, default=0.005, help="seconds per hub request, one at a time")
    p.add_argument(
        "--user-latency", type=float, default=0.0, help="seconds per single-user request, concurrent"
    )
    p.add_argument("--stop-time", type=float, default=0.0, help="seconds the spawner takes to stop")
    p.add_argument("--slow-stop-timeout", type=float, default=SLOW_STOP_TIMEOUT)
    p.add_argument("--port", type=int, default=0, help="public port (hub API + proxy); 0 = any")
    p.add_argument("--shared-target", action="store_true", help="one direct port for every server")
    p.add_argument("--max-ports", type=int, default=None)
    p.add_argument("--token", default=None)
    return p.parse_args(list(argv) if argv is not None else None)


async def serve(args: argparse.Namespace) -> None:
    pop = Population(
        users=args.users,
        named_share=args.named_share,
        active=args.active,
        idle_attached=args.idle_attached,
        idle_detached=args.idle_detached,
        computing=args.computing,
        idle_hours=tuple(args.idle_hours),
        seed=args.seed,
        staff=not args.no_staff,
    )
    n = pop.n_servers()
    limit = raise_fd_limit(n + 2048)
    max_ports = args.max_ports if args.max_ports is not None else max(1, limit - 2048)
    sim = HubSim(
        pop,
        hub_latency=args.hub_latency,
        user_latency=args.user_latency,
        stop_time=args.stop_time,
        token=args.token,
        slow_stop_timeout=args.slow_stop_timeout,
        per_server_ports=not args.shared_target,
        max_ports=max_ports,
    )
    await sim.start(args.port)
    print(
        json.dumps(
            {
                "url": sim.url,
                "api_url": sim.api_url,
                "token": sim.token,
                "users": len(sim.users),
                "servers": sim.running(),
                "categories": sim.categories(),
                "direct_ports": len(sim._ports),
            }
        ),
        flush=True,
    )
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await sim.close()


def main(argv: Iterable[str] | None = None) -> int:
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
