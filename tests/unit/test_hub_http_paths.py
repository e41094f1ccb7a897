"""The hub client's two transports answer alike: httpx (respx tests, ``hub.http: httpx``) and
aiohttp (the default; no httpx Request/Response objects on the hot path). Checked against the hub
simulator over real loopback HTTP: listing, a 204 stop, a 202 stop, a missing server, and a hub
that is down."""

from __future__ import annotations

import socket

import pytest

from benchmarks.hubsim import HubSim, Population
from reaper.hub import HubClient, HubError, HubOptions, ProbeOptions
from reaper.hub.transport import AiohttpTransport

TOKEN = "sim-token"


@pytest.fixture
async def sim():
    s = HubSim(Population(users=30, named_share=0.2, idle_detached=1), token=TOKEN, hub_latency=0.0,
               stop_time=0.0, slow_stop_timeout=0.2)
    await s.start()
    yield s
    await s.close()


def client(url: str, http: str, backoff: float = 0.5) -> HubClient:
    return HubClient(url, TOKEN, HubOptions(http=http, page_size=7, retries=1, timeout=5, backoff=backoff))


@pytest.mark.parametrize("http", ["aiohttp", "httpx"])
async def test_listing_and_stops_answer_alike_on_both_paths(sim: HubSim, http: str) -> None:
    async with client(sim.api_url, http) as hub:
        assert isinstance(hub.api.transport, AiohttpTransport) == (http == "aiohttp")
        servers = await hub.list_active_servers()
        assert len(servers) == 36  # 30 default servers + 6 named, over pages of 7
        assert len({(s.user, s.name) for s in servers}) == 36
        named = next(s for s in servers if s.name)
        one = await hub.get_server(named.user, named.name)
        assert one is not None and one.started == named.started
        first = next(s for s in servers if not s.name)
        assert (await hub.stop(first.user)).outcome == "stopped"
        assert (await hub.stop("no-such-user")).outcome == "gone"  # 404
        sim.stop_time = 1.0  # slower than the hub's slow-stop timeout: 202
        assert (await hub.stop(named.user, named.name)).outcome == "pending"


@pytest.mark.parametrize("http", ["aiohttp", "httpx"])
async def test_a_hub_that_is_down_is_an_error_after_the_retries_on_both_paths(http: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    async with client(f"http://127.0.0.1:{port}/hub/api", http, backoff=0.01) as hub:
        with pytest.raises(HubError, match="ConnectError.*after 2 attempts"):
            await hub.list_active_servers()
        result = await hub.stop("alice")
        assert result.outcome == "error" and "after 2 attempts" in result.detail


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("terminals", [True, False])
@pytest.mark.parametrize("http", ["aiohttp", "httpx"])
async def test_probes_leave_no_idle_connection_to_the_servers_behind(sim: HubSim, http: str,
                                                                     terminals: bool) -> None:
    # A sweep talks to each server once: a connection kept alive after its probe is a file
    # descriptor (and a few KB) per server, ~10,000 on a big hub, until the pool's timer runs.
    import asyncio

    async with HubClient(sim.api_url, TOKEN, HubOptions(http=http), ProbeOptions(terminals=terminals)) as hub:
        servers = await hub.list_active_servers()
        await asyncio.sleep(0.05)
        before = _open_fds()
        probes = await asyncio.gather(*(hub.probe(s) for s in servers))
        assert all(p.ok for p in probes) and sum(len(p.kernels) for p in probes) > 0
        await asyncio.sleep(0.05)  # the closes land (both ends live in this process)
        # each server's probe ended with "Connection: close": nothing of the 36 is left open
        assert _open_fds() - before <= 2, f"{_open_fds() - before} descriptors left open by 36 probes"
        # and so does the status-only look (a server detached at its last look)
        statuses = await asyncio.gather(*(hub.probe_status(s) for s in servers))
        assert all(p.ok and p.status_kernels is not None for p in statuses)
        await asyncio.sleep(0.05)
        assert _open_fds() - before <= 2, f"{_open_fds() - before} descriptors left open by 36 status probes"


@pytest.mark.parametrize("via", ["direct", "proxy"])
async def test_probes_answer_alike_on_both_paths_direct_and_through_the_proxy(sim: HubSim, via: str) -> None:
    seen = {}
    for http in ("aiohttp", "httpx"):
        async with HubClient(sim.api_url, TOKEN, HubOptions(http=http), ProbeOptions(via=via, public_url=sim.url)) as hub:
            servers = await hub.list_active_servers()
            probes = [await hub.probe(s) for s in servers]
            assert all(p.ok and p.via == via for p in probes), [p.error for p in probes if not p.ok]
            seen[http] = [(s.label, p.status_connections, p.status_kernels, len(p.kernels), p.terminals)
                          for s, p in zip(servers, probes, strict=True)]
    assert seen["aiohttp"] == seen["httpx"]


def test_the_default_path_never_imports_httpx() -> None:
    # ~10 MB the long-running service does not need: httpx loads only for hub.http "httpx"
    import subprocess
    import sys

    code = ("import sys; from reaper.service import make_hub_client; "
            "from reaper.hub import HubClient, HubOptions, ProbeOptions; "
            "HubClient('http://127.0.0.1:1/hub/api', 't'); "
            "HubClient('http://127.0.0.1:1/hub/api', 't', None, ProbeOptions(via='proxy', public_url='http://127.0.0.1:1')); "
            "print('httpx' in sys.modules); HubClient('http://127.0.0.1:1/hub/api', 't', HubOptions(http='httpx')); "
            "print('httpx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


@pytest.mark.parametrize("http", ["aiohttp", "httpx"])
async def test_a_full_look_after_a_status_look_does_not_ask_the_status_again(http: str) -> None:
    sim = HubSim(Population(users=1, computing=1), token=TOKEN, hub_latency=0.0, stop_time=0.0)
    await sim.start()
    try:
        async with client(sim.api_url, http) as hub:
            [srv] = await hub.list_active_servers()
            alone = await hub.probe(srv)
            sim.reset()
            status = await hub.probe_status(srv)
            assert status.ok and status.status_kernels == 1
            full = await hub.probe(srv, status=status)
            asked = {k: v for k, v in sim.stats()["requests"].items() if " GET /" in k and "/hub/api" not in k}
        assert full.ok and full.kernels == alone.kernels and full.status_last_activity == alone.status_last_activity
        assert full.status_connections == alone.status_connections and full.status_kernels == 1
        assert full.status_started == alone.status_started and full.terminals == alone.terminals
        assert sorted(k.rsplit("/", 1)[-1] for k in asked for _ in range(asked[k])) == ["kernels", "status", "terminals"]
    finally:
        await sim.close()
