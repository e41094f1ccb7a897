"""Where each single-user server really listens: its own address, for probes sent to it directly.

Probes through configurable-http-proxy count as activity (STACK.md), so a probe goes to the
server's own address: ``HubServer.target``, else the spawner state's ``server_url``, else the
hub's proxy table (``GET /hub/api/proxy``, scope ``proxy``), fetched once per sweep by
:meth:`RouteTable.refresh`. The hub rebuilds the whole table for every page it serves, so pages are
as large as ``page_size`` allows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextlib import aclosing
from typing import Any
from urllib.parse import urlsplit

from reaper.core.model import HubServer

from .api import HubAPI, HubError
from .models import url_path

log = logging.getLogger(__name__)


def routes_from_page(items: Any) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """One page of the proxy table -> (routespec -> target for the routes that name no server,
    (user, server name) -> target for those that do). Held once each: a big hub's table is not
    kept twice. Raises HubError when the page is not a table."""
    if not isinstance(items, dict):
        raise HubError("proxy table: routes are not an object")
    by_spec: dict[str, str] = {}
    by_server: dict[tuple[str, str], str] = {}
    for routespec, route in items.items():
        if not isinstance(route, dict) or not isinstance(route.get("target"), str):
            continue
        data = route.get("data") or {}
        if isinstance(data, dict) and isinstance(data.get("user"), str):
            by_server[(data["user"], str(data.get("server_name") or ""))] = route["target"]
        else:
            by_spec[str(routespec)] = route["target"]
    return by_spec, by_server


def own_address(server: HubServer) -> str | None:
    """The address the server brings itself: HubServer.target, else the spawner state's server_url."""
    if server.target:
        return server.target
    url = server.state.get("server_url") if isinstance(server.state, dict) else None
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        return url
    return None


def routed_address(
    server: HubServer, by_spec: Mapping[str, str], by_server: Mapping[tuple[str, str], str]
) -> str | None:
    """The server's target in the proxy table: by its user and name, else by its url's routespec
    (as given, its path, or 'host/path/' on a hub with subdomains)."""
    found = by_server.get((server.user, server.name))
    if found:
        return found
    if server.url in by_spec:
        return by_spec[server.url]
    path = url_path(server.url)
    if path in by_spec:
        return by_spec[path]
    host = urlsplit(server.url).netloc if "://" in server.url else ""
    if host and host + path in by_spec:
        return by_spec[host + path]
    return None


class RouteTable:
    """The proxy table, cached for a sweep's probes."""

    def __init__(self, api: HubAPI, *, page_size: int) -> None:
        self._api = api
        self._page_size = page_size
        self._by_spec: dict[str, str] | None = None  # None: not fetched yet
        self._by_server: dict[tuple[str, str], str] = {}
        self.error: str | None = None  # why the last fetch failed
        self._lock = asyncio.Lock()

    async def _fetch(self) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
        by_spec: dict[str, str] = {}
        by_server: dict[tuple[str, str], str] = {}
        pages = self._api.pages(self._api.url("proxy"), "proxy table", page_size=self._page_size)
        async with aclosing(pages):
            async for items, _total in pages:
                spec, server = routes_from_page(items)
                by_spec.update(spec)
                by_server.update(server)
        return by_spec, by_server

    async def refresh(self) -> int:
        """Fetch the table; returns how many servers it routes. Never raises: on failure the cache
        is empty and ``error`` says why."""
        async with self._lock:
            try:
                self._by_spec, self._by_server = await self._fetch()
                self.error = None
            except HubError as exc:
                self._by_spec, self._by_server = {}, {}
                self.error = str(exc)
                log.warning("proxy table unavailable: %s", exc)
            return len(self._by_server)

    async def target_for(self, server: HubServer) -> str | None:
        """The server's own address (see the module's docstring); the table is fetched on first
        need. None when nothing knows it."""
        own = own_address(server)
        if own:
            return own
        if self._by_spec is None:
            await self.refresh()
        return routed_address(server, self._by_spec or {}, self._by_server)
