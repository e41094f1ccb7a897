"""The hub client's default HTTP path: requests sent straight through aiohttp.

A request through httpx costs about 1 ms of client CPU (encode/httpx#3215) and a sweep of a big hub
makes tens of thousands of them; aiohttp does the same request for a fraction of that. This module
does not import httpx (~10 MB the service does not load unless ``hub.http: httpx`` asks for it):
connection-level failures are its own two exceptions, named as httpx names them, so both paths
report alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
from yarl import URL


class TransportFailure(Exception):
    """No HTTP answer came back (connection refused or reset, protocol error)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind  # httpx's name for the same failure: "ConnectError", "RemoteProtocolError"...


class TransportTimeout(TransportFailure):
    """No answer within the timeout."""


@contextmanager
def transport_errors() -> Iterator[None]:
    """aiohttp's failures as TransportTimeout / TransportFailure."""
    try:
        yield
    except TimeoutError as e:
        raise TransportTimeout("ReadTimeout", f"timed out ({e.__class__.__name__})") from None
    except aiohttp.ClientConnectorError as e:
        raise TransportFailure("ConnectError", str(e)) from None
    except aiohttp.ServerDisconnectedError as e:
        raise TransportFailure("RemoteProtocolError", str(e)) from None
    except aiohttp.ClientError as e:
        raise TransportFailure("TransportError", f"{e.__class__.__name__}: {e}") from None


class AiohttpSender:
    """One aiohttp session (made on first use, in the running loop) and its connection pool."""

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
            # no Accept-Encoding sent: answers come uncompressed, read as they are
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  skip_auto_headers=("User-Agent", "Accept-Encoding"))
        return self._session

    async def send_raw(
        self, method: str, url: str, headers: dict[str, str], *, seconds: float, body: bytes | None = None
    ) -> tuple[int, bytes]:
        """One request: (status, body). Raises TransportTimeout / TransportFailure when no answer
        came back. ``url`` is sent as given (already quoted: never re-quoted)."""
        session = self._get_session()
        with transport_errors():
            async with session.request(
                method, URL(url, encoded=True), headers=headers, allow_redirects=False, data=body,
                timeout=aiohttp.ClientTimeout(total=None, connect=seconds, sock_read=seconds),
            ) as resp:
                return resp.status, await resp.read()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

