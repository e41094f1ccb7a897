"""The hub adapter's one way to send a request: ``Transport.send(...) -> Answer``.

Every request of the hub client (hub API calls and probes of the single-user servers) and of the
page's login goes through one ``send``. Two implementations answer alike:

- :class:`AiohttpTransport` (here; the default): a request through httpx costs about 1 ms of
  client CPU (encode/httpx#3215) and a sweep of a big hub makes tens of thousands of them; aiohttp
  does the same for a fraction of that.
- ``HttpxTransport`` (``reaper.hub.httpx_transport``): for ``hub.http: httpx`` and for the respx
  tests, which mock httpx. It lives in its own module so that the service never imports httpx
  (~10 MB) unless asked to.

A request that gets no HTTP answer raises :class:`TransportFailure` (or :class:`TransportTimeout`),
whose ``kind`` is httpx's name for the failure ("ConnectError", "ReadTimeout", ...) on both, so
that reasons read alike whichever transport sent the request. Any HTTP answer, a 5xx included, is
an :class:`Answer`: what to make of it is the caller's business.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from yarl import URL


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer as the hub adapter uses it: the status and the body as bytes.

    (No headers: nothing of the hub's or a server's answer headers decides anything here.)"""

    status: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON; raises json.JSONDecodeError / UnicodeDecodeError."""
        return json.loads(self.content)


class TransportFailure(Exception):
    """No HTTP answer came back (connection refused or reset, protocol error)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind  # httpx's name for the failure: "ConnectError", "RemoteProtocolError"...


class TransportTimeout(TransportFailure):
    """No answer within the timeout."""


class Transport(Protocol):
    """Sends one request. ``url`` is complete (query included) and already quoted: it is sent as
    given, never re-quoted. Redirects are not followed. Raises TransportFailure / TransportTimeout
    when no answer came back."""

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, seconds: float
    ) -> Answer: ...

    async def aclose(self) -> None: ...


def _failure(exc: Exception) -> TransportFailure:
    """aiohttp's failure, named as httpx names it."""
    if isinstance(exc, TimeoutError):
        return TransportTimeout("ReadTimeout", f"timed out ({exc.__class__.__name__})")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return TransportFailure("ConnectError", str(exc))
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return TransportFailure("RemoteProtocolError", str(exc))
    return TransportFailure("TransportError", f"{exc.__class__.__name__}: {exc}")


class AiohttpTransport:
    """One aiohttp session (made on first use, in the running loop) and its connection pool.

    ``deadline``: the timeout bounds the whole request (probes: a server that trickles its answer
    is as good as down); otherwise it bounds the connect and each read (hub calls: a stop's DELETE
    may take as long as the spawner, while the hub keeps the connection alive)."""

    def __init__(
        self, *, limit: int = 64, limit_per_host: int = 2, keepalive_timeout: float = 15.0, deadline: bool = False
    ) -> None:
        self.limit = limit
        self.limit_per_host = limit_per_host
        self.keepalive_timeout = keepalive_timeout
        self.deadline = deadline
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

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        if self.deadline:
            return aiohttp.ClientTimeout(total=seconds)
        return aiohttp.ClientTimeout(total=None, connect=seconds, sock_read=seconds)

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, seconds: float
    ) -> Answer:
        session = self._get_session()
        try:
            async with session.request(
                method, URL(url, encoded=True), headers=headers, data=body, allow_redirects=False,
                timeout=self._timeout(seconds),
            ) as resp:
                return Answer(resp.status, await resp.read())
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _failure(exc) from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
