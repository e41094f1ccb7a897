"""httpx's side of the hub client (``hub.http: httpx``, and the respx tests): a probe pool per
server address. Imported only when that path is used."""

from __future__ import annotations

import httpx


class PerHostTransport(httpx.AsyncBaseTransport):
    """Probes go to one host per server. httpx's single pool scans all its connections (twice,
    quadratically) on every request, which on a hub of thousands of servers costs more CPU than the
    probes themselves. This keeps one tiny keep-alive pool per server address instead, the least
    recently used ones closed once idle beyond ``max_hosts``."""

    def __init__(self, *, per_host: int = 2, max_hosts: int = 64) -> None:
        import ssl

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
