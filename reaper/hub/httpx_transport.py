"""The hub transport over httpx (``hub.http: httpx``, and the respx tests, which mock httpx).

Imported only when that path is used: the service does not load httpx (~10 MB) otherwise. Same
interface and failures as :class:`reaper.hub.transport.AiohttpTransport`.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

import httpx

from .transport import Answer, TransportFailure, TransportTimeout


class HttpxTransport:
    """One httpx client (its own pool). ``per_server``: a tiny pool per server address instead of
    one shared pool (see :class:`PerHostTransport`), for probes sent straight to the servers."""

    def __init__(self, *, connections: int, keepalive: int, per_server: int = 0) -> None:
        pools = PerHostTransport(per_host=2, max_hosts=per_server) if per_server else None
        # transport=None: httpx's own, which respx replaces in tests
        self._client = httpx.AsyncClient(
            transport=pools,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=keepalive),
            follow_redirects=False,
        )

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, seconds: float
    ) -> Answer:
        try:
            response = await self._client.request(method, url, headers=headers, content=body, timeout=seconds)
        except httpx.TimeoutException as exc:
            raise TransportTimeout(type(exc).__name__, str(exc)) from None
        except httpx.TransportError as exc:
            raise TransportFailure(type(exc).__name__, str(exc)) from None
        return Answer(response.status_code, response.content)

    async def aclose(self) -> None:
        await self._client.aclose()


class PerHostTransport(httpx.AsyncBaseTransport):
    """Probes go to one host per server. httpx's single pool scans all its connections (twice,
    quadratically) on every request, which on a hub of thousands of servers costs more CPU than the
    probes themselves. This keeps one tiny keep-alive pool per server address instead, the least
    recently used ones closed once idle beyond ``max_hosts``."""

    def __init__(self, *, per_host: int = 2, max_hosts: int = 64) -> None:
        self.per_host = per_host
        self.max_hosts = max_hosts
        self._ssl = ssl.create_default_context()  # made once, shared by every pool
        self._pools: dict[tuple[bytes, bytes, int | None], httpx.AsyncHTTPTransport] = {}

    def _pool_for(self, url: httpx.URL) -> httpx.AsyncHTTPTransport:
        key = (url.raw_scheme, url.raw_host, url.port)
        pool = self._pools.pop(key, None)
        if pool is None:
            limits = httpx.Limits(max_connections=self.per_host, max_keepalive_connections=self.per_host)
            pool = httpx.AsyncHTTPTransport(verify=self._ssl, limits=limits)
        self._pools[key] = pool  # most recently used last
        return pool

    def _idle_to_close(self) -> list[httpx.AsyncHTTPTransport]:
        out = []
        excess = len(self._pools) - self.max_hosts
        if excess <= 0:
            return out
        for key in list(self._pools):
            if excess <= 0:
                break
            pool = self._pools[key]
            conns = pool._pool.connections
            if all(c.is_idle() or c.is_closed() for c in conns) and not pool._pool._requests:
                out.append(self._pools.pop(key))
                excess -= 1
        return out

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pool = self._pool_for(request.url)
        for old in self._idle_to_close():
            await old.aclose()
        return await pool.handle_async_request(request)

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()
