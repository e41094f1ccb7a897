"""An httpx transport that sends requests with aiohttp.

The reaper keeps httpx's API (and respx in the adapter tests), but a probe through httpx costs about
1 ms of client CPU (encode/httpx#3215) and a sweep of a big hub makes tens of thousands of them.
aiohttp's client does the same request for a fraction of that. Used for the direct probes (one
small connection pool per server address, kept by aiohttp's connector).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import httpx
from yarl import URL


@contextmanager
def _as_httpx_errors(request: httpx.Request | None) -> Iterator[None]:
    """aiohttp's failures as the httpx exceptions the hub client handles."""
    try:
        yield
    except TimeoutError as e:
        raise httpx.ReadTimeout(f"timed out ({e.__class__.__name__})", request=request) from None
    except aiohttp.ClientConnectorError as e:
        raise httpx.ConnectError(str(e), request=request) from None
    except aiohttp.ServerDisconnectedError as e:
        raise httpx.RemoteProtocolError(str(e), request=request) from None
    except aiohttp.ClientError as e:
        raise httpx.TransportError(f"{e.__class__.__name__}: {e}") from None


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, limit: int = 64, limit_per_host: int = 2, keepalive_timeout: float = 15.0) -> None:
        self.limit = limit
        self.limit_per_host = limit_per_host
        self.keepalive_timeout = keepalive_timeout
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.limit, limit_per_host=self.limit_per_host, keepalive_timeout=self.keepalive_timeout
            )
            # httpx decodes the body itself (Content-Encoding stays on the response).
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  skip_auto_headers=("User-Agent", "Accept-Encoding"))
        return self._session

    @staticmethod
    def _timeout(request: httpx.Request) -> aiohttp.ClientTimeout:
        t: dict[str, Any] = request.extensions.get("timeout") or {}
        return aiohttp.ClientTimeout(total=None, connect=t.get("connect"), sock_read=t.get("read"))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._get_session()
        body = await request.aread() if request.method not in ("GET", "HEAD") else None
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw if k.lower() != b"host"]
        with _as_httpx_errors(request):
            async with session.request(
                request.method,
                URL(str(request.url), encoded=True),  # as httpx quoted it: never re-quoted
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=self._timeout(request),
            ) as resp:
                content = await resp.read()
                raw_headers = [(k, v) for k, v in resp.raw_headers]
                status = resp.status
        return httpx.Response(status_code=status, headers=raw_headers, content=content, request=request)

    async def send_raw(
        self, method: str, url: str, headers: dict[str, str], *, seconds: float
    ) -> tuple[int, bytes]:
        """The same request without httpx's Request/Response objects: (status, body). Raises the
        httpx exceptions handle_async_request raises, so callers handle both alike."""
        session = self._get_session()
        with _as_httpx_errors(None):
            async with session.request(
                method, URL(url, encoded=True), headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=seconds, sock_read=seconds),
            ) as resp:
                return resp.status, await resp.read()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
