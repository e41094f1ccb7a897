"""The hub transports (reaper.hub.transport): aiohttp (the default) and httpx answer alike, over
real loopback HTTP to a small aiohttp server: any HTTP answer is an Answer, no answer is a
TransportFailure named as httpx names it; URLs go as given; redirects are not followed. And the
hub client sends every request, hub call or probe, through its transport's one ``send``."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime

import pytest
from aiohttp import web

from reaper.core.model import HubServer
from reaper.hub import Answer, HubClient, HubOptions, ProbeOptions, TransportFailure, TransportTimeout
from reaper.hub.httpx_transport import HttpxTransport
from reaper.hub.transport import AiohttpTransport


def transport(kind: str, *, deadline: bool = False):
    if kind == "aiohttp":
        return AiohttpTransport(limit=4, limit_per_host=4, deadline=deadline)
    return HttpxTransport(connections=4, keepalive=4)


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"method": request.method, "raw_path": request.raw_path,
                              "auth": request.headers.get("Authorization"), "body": body.decode()})


async def fail(request: web.Request) -> web.Response:
    return web.Response(status=503, body=b"busy")


async def moved(request: web.Request) -> web.Response:
    raise web.HTTPFound("/echo")


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(1)
    return web.Response(text="late")


async def trickle(request: web.Request) -> web.StreamResponse:
    """Answers at once, then its body a chunk every 50 ms for about a second."""
    resp = web.StreamResponse()
    await resp.prepare(request)
    for _ in range(20):
        await resp.write(b"x")
        await asyncio.sleep(0.05)
    await resp.write_eof()
    return resp


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/a%2Fb/echo", echo)
    app.router.add_get("/fail", fail)
    app.router.add_get("/moved", moved)
    app.router.add_get("/slow", slow)
    app.router.add_get("/trickle", trickle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.mark.parametrize("kind", ["aiohttp", "httpx"])
async def test_an_answer_is_its_status_and_body_and_the_request_goes_as_given(server: str, kind: str) -> None:
    t = transport(kind)
    try:
        answer = await t.send("POST", f"{server}/a%2Fb/echo?x=1&y=%2F", {"Authorization": "token t"}, b"form=1", 5)
        assert isinstance(answer, Answer) and answer.status == 200
        assert answer.json() == {"method": "POST", "raw_path": "/a%2Fb/echo?x=1&y=%2F", "auth": "token t",
                                 "body": "form=1"}  # never re-quoted
        failed = await t.send("GET", f"{server}/fail", {}, None, 5)
        assert (failed.status, failed.content, failed.text) == (503, b"busy", "busy")  # a 5xx is an answer
        redirect = await t.send("GET", f"{server}/moved", {}, None, 5)
        assert redirect.status == 302  # not followed
    finally:
        await t.aclose()


@pytest.mark.parametrize("kind", ["aiohttp", "httpx"])
async def test_no_answer_is_a_transport_failure_named_as_httpx_names_it(server: str, kind: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    t = transport(kind)
    try:
        with pytest.raises(TransportFailure) as refused:
            await t.send("GET", f"http://127.0.0.1:{port}/", {}, None, 5)
        assert refused.value.kind == "ConnectError" and not isinstance(refused.value, TransportTimeout)
        with pytest.raises(TransportTimeout) as late:
            await t.send("GET", f"{server}/slow", {}, None, 0.2)
        assert late.value.kind == "ReadTimeout"
    finally:
        await t.aclose()


async def test_a_deadline_bounds_the_whole_request_otherwise_each_read(server: str) -> None:
    # probes: a server that trickles its answer is as good as down; hub calls: a long stop is fine
    # while the hub keeps answering
    per_read, deadline = transport("aiohttp"), transport("aiohttp", deadline=True)
    try:
        assert (await per_read.send("GET", f"{server}/trickle", {}, None, 0.5)).content == b"x" * 20
        with pytest.raises(TransportTimeout):
            await deadline.send("GET", f"{server}/trickle", {}, None, 0.5)
    finally:
        await per_read.aclose()
        await deadline.aclose()


class Recording:
    """A Transport answering from a table, recording every request."""

    def __init__(self, answers: Mapping[str, tuple[int, bytes]]) -> None:
        self.answers = answers
        self.sent: list[tuple[str, str, dict[str, str], float]] = []
        self.closed = False

    async def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
                   seconds: float) -> Answer:
        self.sent.append((method, url, dict(headers), seconds))
        path = url.split("://", 1)[1].split("/", 1)[1].split("?", 1)[0]
        status, content = self.answers.get(f"{method} /{path}", (404, b""))
        return Answer(status, content)

    async def aclose(self) -> None:
        self.closed = True


async def test_the_client_sends_every_hub_call_and_probe_through_its_transports() -> None:
    user = (b'{"name": "alice", "servers": {"": {"name": "", "url": "/user/alice/", "ready": true,'
            b' "started": "2026-11-25T20:00:00Z", "last_activity": null}}}')
    hub = Recording({"GET /hub/api/users/alice": (200, user), "DELETE /hub/api/users/alice/server": (204, b"")})
    servers = Recording({"GET /user/alice/api/status": (200, b'{"connections": 0, "kernels": 1}'),
                         "GET /user/alice/api/kernels": (200, b"[]"), "GET /user/alice/api/terminals": (200, b"[]")})
    client = HubClient("http://hub:8081/hub/api", "service-token", HubOptions(timeout=7, stop_timeout=20),
                       ProbeOptions(timeout=3, token="probe-token"), transports=(hub, servers))
    async with client:
        srv = await client.get_server("alice")
        assert srv == HubServer(user="alice", name="", started=datetime(2026, 11, 25, 20, tzinfo=UTC),
                                last_activity=None, ready=True, url="/user/alice/")
        probe = await client.probe(HubServer(user="alice", name="", started=None, last_activity=None,
                                             url="/user/alice/", target="http://node1:5000"))
        assert probe.ok and probe.status_kernels == 1
        assert (await client.stop("alice")).outcome == "stopped"
    assert hub.closed and servers.closed
    assert [(m, u, h["Authorization"], s) for m, u, h, s in hub.sent] == [
        ("GET", "http://hub:8081/hub/api/users/alice", "token service-token", 7),
        ("DELETE", "http://hub:8081/hub/api/users/alice/server", "token service-token", 20),
    ]
    asked = sorted((u, h["Authorization"], h.get("Connection"), s) for _, u, h, s in servers.sent)
    assert asked == [
        ("http://node1:5000/user/alice/api/kernels?no_track_activity=1", "token probe-token", "close", 3),
        ("http://node1:5000/user/alice/api/status?no_track_activity=1", "token probe-token", None, 3),
        ("http://node1:5000/user/alice/api/terminals?no_track_activity=1", "token probe-token", "close", 3),
    ]
