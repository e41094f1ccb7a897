"""A loopback HTTP reverse proxy that injects faults deterministically (aiohttp).

Put it between the reaper and the hub API (``HubClient(proxy.url + "/hub/api", ...)``) or in front
of one single-user server. Every request is matched against the rules in the order they were
added; the first rule that matches (method + regular expression searched in ``path?query``) and
still has uses left decides what happens, and counts one injection:

    hub = FaultProxy(real_hub.hub_url)
    await hub.start()
    hub.fail("GET", r"/hub/api/users\\?.*offset=1\\b", status=503, times=None)   # page 2, always
    hub.timeout("GET", r"/hub/api/users\\?", seconds=3, times=2)                # no answer for 3 s, twice
    hub.slow(None, r"/hub/api/", seconds=0.3, times=None)                       # late but correct
    hub.garbage("GET", r"offset=2", times=1)                                    # 200 + invalid JSON
    hub.drop("GET", r"offset=0")                                                # connection closed, no answer
    hub.accept("DELETE", r"/server$")                                           # 202, never forwarded
    hub.hook("GET", r"/hub/api/users/alice$", restart_the_hub)                  # run code, then forward
    ...
    probe = FaultProxy()                       # its upstream is filled in from the route table
    await probe.start()
    hub.divert("alice", "", probe)             # GET /hub/api/proxy now says alice's server is `probe`
    probe.fail("GET", r"/api/kernels", status=403, times=None)

Kinds: ``status`` (answer a status, never forwarded), ``timeout`` (hold the request for
``seconds``, then answer 504 without forwarding, so a late DELETE never reaches the hub), ``slow``
(wait, then forward), ``garbage`` (200 with a body that is not JSON), ``drop`` (close the
connection without an answer), ``accept`` (202, never forwarded), ``hook`` (await/run a function,
then forward). ``times=None`` means every matching request. When the upstream cannot be reached
the proxy drops the client's connection, as a dead host would.

Counters: ``rule.injected`` per rule, ``proxy.injected()`` per kind (or for a label), and
``proxy.requests`` (method, path?query, what happened) for every request seen.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["FaultProxy", "Rule"]

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "accept-encoding",
}

Hook = Callable[[], Awaitable[None] | None]


@dataclass
class Rule:
    method: str | None  # None: any method
    path: str  # regular expression, searched in "path?query"
    kind: str  # status | timeout | slow | garbage | drop | accept | hook
    times: int | None = 1  # uses left; None: forever
    status: int = 500
    seconds: float = 0.0
    body: bytes = b""
    hook: Hook | None = None
    label: str = ""
    injected: int = 0
    _rx: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rx = re.compile(self.path)
        if not self.label:
            self.label = f"{self.kind}{'' if self.kind != 'status' else ' ' + str(self.status)}"

    def matches(self, method: str, path_qs: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self._rx.search(path_qs) is not None

    def use(self) -> None:
        self.injected += 1
        if self.times is not None:
            self.times -= 1

    @property
    def spent(self) -> bool:
        return self.times is not None and self.times <= 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FaultProxy:
    def __init__(self, upstream: str | None = None, *, name: str = "fault-proxy") -> None:
        self.upstream = upstream.rstrip("/") if upstream else None
        self.name = name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str, str]] = []
        self._diverted: dict[tuple[str, str], FaultProxy] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=120)
        )
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- rules -------------------------------------------------------------------------------

    def add(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule

    def fail(self, method: str | None, path: str, *, status: int = 500, times: int | None = 1,
             body: bytes | None = None, label: str = "") -> Rule:
        payload = body if body is not None else json.dumps(
            {"status": status, "message": f"injected by {self.name}"}
        ).encode()
        return self.add(Rule(method, path, "status", times, status=status, body=payload, label=label))

    def timeout(self, method: str | None, path: str, *, seconds: float, times: int | None = 1,
                label: str = "") -> Rule:
        return self.add(Rule(method, path, "timeout", times, seconds=seconds, label=label))

    def slow(self, method: str | None, path: str, *, seconds: float, times: int | None = 1,
             label: str = "") -> Rule:
        return self.add(Rule(method, path, "slow", times, seconds=seconds, label=label))

    def garbage(self, method: str | None, path: str, *, times: int | None = 1,
                body: bytes = b'{"items": [ {"name": "trunc', label: str = "") -> Rule:
        return self.add(Rule(method, path, "garbage", times, status=200, body=body, label=label))

    def drop(self, method: str | None, path: str, *, times: int | None = 1, label: str = "") -> Rule:
        return self.add(Rule(method, path, "drop", times, label=label))

    def accept(self, method: str | None, path: str, *, times: int | None = 1, label: str = "") -> Rule:
        return self.add(Rule(method, path, "accept", times, status=202, label=label))

    def hook(self, method: str | None, path: str, fn: Hook, *, times: int | None = 1, label: str = "") -> Rule:
        return self.add(Rule(method, path, "hook", times, hook=fn, label=label))

    def clear(self) -> None:
        """Forget every rule (counters of past rules stay on the Rule objects the caller kept)."""
        self.rules.clear()

    def divert(self, user: str, server: str, to: FaultProxy) -> None:
        """Rewrite the route of user/server in ``GET /hub/api/proxy`` answers to point at ``to``
        (whose upstream becomes the server's real address), so that probes go through it."""
        self._diverted[(user, server)] = to

    def injected(self, kind: str | None = None, *, label: str | None = None) -> int:
        return sum(
            r.injected
            for r in self.rules
            if (kind is None or r.kind == kind) and (label is None or r.label == label)
        )

    def count(self, method: str | None, path: str, outcome: str | None = None) -> int:
        """How many requests seen matched method + regex (and, if given, the outcome)."""
        rx = re.compile(path)
        return sum(
            1
            for m, p, o in self.requests
            if (method is None or m == method.upper()) and rx.search(p) and (outcome is None or o == outcome)
        )

    # -- the proxy ---------------------------------------------------------------------------

    def _match(self, method: str, path_qs: str) -> Rule | None:
        for rule in self.rules:
            if rule.matches(method, path_qs):
                return rule
        return None

    @staticmethod
    async def _drop(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.abort()
        # aiohttp cannot write to an aborted transport; raising ends the handler quietly.
        raise asyncio.CancelledError()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        method, path_qs = request.method, request.path_qs
        body = await request.read()
        rule = self._match(method, path_qs)
        if rule is not None:
            rule.use()
            self.requests.append((method, path_qs, rule.kind))
            if rule.kind == "status":
                return web.Response(status=rule.status, body=rule.body, content_type="application/json")
            if rule.kind == "accept":
                return web.Response(status=202)
            if rule.kind == "garbage":
                return web.Response(status=200, body=rule.body, content_type="application/json")
            if rule.kind == "drop":
                return await self._drop(request)
            if rule.kind == "timeout":
                await asyncio.sleep(rule.seconds)
                return web.Response(status=504, text="injected timeout", content_type="text/plain")
            if rule.kind == "slow":
                await asyncio.sleep(rule.seconds)
            elif rule.kind == "hook" and rule.hook is not None:
                if inspect.iscoroutinefunction(rule.hook):
                    await rule.hook()
                else:
                    res = await asyncio.to_thread(rule.hook)
                    if inspect.isawaitable(res):
                        await res
        else:
            self.requests.append((method, path_qs, "pass"))
        return await self._forward(request, body)

    async def _forward(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if self.upstream is None or self._session is None:
            return await self._drop(request)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Accept-Encoding"] = "identity"
        try:
            async with self._session.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=body or None,
                allow_redirects=False,
            ) as up:
                data = await up.read()
                status = up.status
                out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP_BY_HOP}
        except (TimeoutError, aiohttp.ClientError, OSError):
            return await self._drop(request)
        if self._diverted and status == 200 and re.match(r"^/hub/api/proxy/?(\?|$)", request.path_qs):
            data = self._rewrite_routes(data)
        return web.Response(status=status, body=data, headers=out_headers)

    def _rewrite_routes(self, data: bytes) -> bytes:
        try:
            doc: Any = json.loads(data)
        except ValueError:
            return data
        routes = doc.get("items") if isinstance(doc, dict) and "_pagination" in doc else doc
        if not isinstance(routes, dict):
            return data
        for route in routes.values():
            if not isinstance(route, dict):
                continue
            info = route.get("data") or {}
            key = (str(info.get("user", "")), str(info.get("server_name") or ""))
            to = self._diverted.get(key)
            if to is None or not isinstance(route.get("target"), str):
                continue
            to.upstream = route["target"].rstrip("/")
            route["target"] = to.url
        return json.dumps(doc).encode()
