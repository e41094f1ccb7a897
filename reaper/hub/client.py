"""Async JupyterHub client: list running servers, look up one, stop one, probe them.

Every request goes through one :class:`~reaper.hub.transport.Transport` (aiohttp by default,
httpx with ``hub.http: httpx``): one keep-alive pool for the hub API, one for the single-user
servers. Hub calls are retried by :class:`~reaper.hub.api.HubAPI`; probes are retried at most once
and never raise: every failure becomes ``Probe.failed("<what>: <why>")``, read by the pure
:mod:`reaper.hub.probe`.

Probing without creating activity (see STACK.md): every probe carries ``?no_track_activity=1``
and, by default, goes to the server's own address (:mod:`reaper.hub.routes`), because requests
through configurable-http-proxy are recorded as activity by the proxy itself. ``via="proxy"``
(opt-in) sends the same paths to ``public_url``: simpler network-wise, but the proxy then keeps
every probed server "active" on the hub.

Listing contract: :meth:`HubClient.iter_active_servers` yields one list per page and raises
:class:`HubListingError` if any page fails or the pages do not add up to the hub's total. The sweep
reads the listing whole (:meth:`HubClient.list_active_servers`) before it looks at anyone; a caller
must not act (notify, stop) on anyone until the iterator has finished without error.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlencode

from reaper.core.model import HubServer, Probe, Work

from .api import HubAPI, HubError, HubListingError, backoff_delay
from .models import quote_segment, servers_from_user, url_path
from .options import HubOptions, ProbeOptions
from .probe import (
    ProbeFailure,
    needs_kernels,
    parse_activity,
    probe_from_answers,
    probe_from_status,
    read_answer,
    status_answer,
)
from .routes import RouteTable
from .transport import AiohttpTransport, Transport, TransportFailure, TransportTimeout

log = logging.getLogger(__name__)

NO_TRACK = {"no_track_activity": "1"}  # on every probe: looking must not count as activity
_NO_TRACK_QUERY = urlencode(NO_TRACK)
PAGE_CALLS = 2  # the page's own hub calls (keep, stop now: get_server, stop): connections kept for them


@dataclass(frozen=True)
class StopResult:
    outcome: Literal["stopped", "pending", "gone", "refused", "error"]
    status: int | None
    detail: str

    @property
    def ok(self) -> bool:
        """True when the server is stopped, stopping, or already gone."""
        return self.outcome not in ("error", "refused")


def open_transports(hub: HubOptions, probes: ProbeOptions) -> tuple[Transport, Transport]:
    """(hub API transport, probe transport) for these options. httpx is imported only for it."""
    hub_conns = hub.concurrency + max(hub.stop_concurrency, 1) + PAGE_CALLS
    probe_conns = (3 if probes.terminals else 2) * probes.concurrency
    direct = probes.via == "direct"
    if hub.http == "httpx":
        from .httpx_transport import HttpxTransport

        # probes sent straight to the servers: a tiny pool per server address (httpx scans its
        # whole pool on every request: one pool of thousands of servers costs more than the probes)
        return (HttpxTransport(connections=hub_conns, keepalive=hub_conns),
                HttpxTransport(connections=probe_conns, keepalive=probes.concurrency,
                               per_server=2 * probes.concurrency if direct else 0))
    hub_transport = AiohttpTransport(limit=hub_conns, limit_per_host=hub_conns)
    if direct:
        # One host per server, asked once a sweep: its connection lives for one probe (status
        # then kernels) and is closed after (see HubClient._get)
        return hub_transport, AiohttpTransport(limit=probe_conns, keepalive_timeout=1.0, deadline=True)
    # every probe goes to the proxy: one keep-alive pool to it
    return hub_transport, AiohttpTransport(limit=probe_conns, limit_per_host=probe_conns, deadline=True)


class HubClient:
    """Async client for the JupyterHub REST API and the single-user servers behind it.

    ``api_url`` is the hub API root, e.g. ``http://127.0.0.1:8081/hub/api``; ``token`` the service's
    API token. ``transports`` (hub API, probes) replace the ones the options would open.
    """

    def __init__(
        self,
        api_url: str,
        token: str,
        options: HubOptions | None = None,
        probes: ProbeOptions | None = None,
        *,
        transports: tuple[Transport, Transport] | None = None,
    ) -> None:
        if not token:
            raise ValueError("a hub API token is required")
        self.options = options = options or HubOptions()
        self.probes = probes = probes or ProbeOptions()
        hub_transport, self._probe_transport = transports or open_transports(options, probes)
        self.api = HubAPI(
            api_url, token, hub_transport, slots=asyncio.Semaphore(options.concurrency), timeout=options.timeout,
            retries=options.retries, backoff=options.backoff, secrets=[probes.token or ""],
        )
        self.api_url = self.api.api_url
        self.public_url = probes.public_url.rstrip("/") if probes.public_url else None
        self._stop_timeout = max(options.stop_timeout, options.timeout)
        self._stop_slots = asyncio.Semaphore(max(options.stop_concurrency, 1))
        self._probe_slots = asyncio.Semaphore(probes.concurrency)
        self._probe_retries = min(max(probes.retries, 0), 1)
        self._probe_headers = {"Authorization": f"token {probes.token or token}", "Accept": "application/json"}
        self._probe_closing = self._probe_headers  # the headers of a probe's last request
        if probes.via == "direct":  # a sweep talks to each server once: close the connection after
            self._probe_closing = {**self._probe_headers, "Connection": "close"}
        self.routes = RouteTable(self.api, page_size=options.page_size)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> HubClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.api.transport.aclose()
        await self._probe_transport.aclose()

    def __repr__(self) -> str:  # never shows the token
        return f"HubClient(api_url={self.api_url!r}, probe_via={self.probes.via!r})"

    def _server_path(self, user: str, server_name: str) -> str:
        if server_name:
            return self.api.url("users", quote_segment(user), "servers", quote_segment(server_name))
        return self.api.url("users", quote_segment(user), "server")

    # -- listing -----------------------------------------------------------------------------

    async def iter_active_servers(self) -> AsyncIterator[list[HubServer]]:
        """One list of HubServer per page of ``GET /users?state=active``.

        Raises HubListingError if a page fails after retries, if an entry is malformed, or if
        the number of users received disagrees with the hub's total. Do not act on anyone
        before the iteration completes.
        """
        users_seen: set[str] = set()
        totals: set[int] = set()
        pages = self.api.pages(self.api.url("users"), "list active users", page_size=self.options.page_size,
                               params={"state": "active"})
        try:
            async with aclosing(pages):
                async for items, total in pages:
                    if not isinstance(items, list):
                        raise HubListingError("list active users: 'items' is not a list")
                    if total is not None:
                        totals.add(total)
                    page: list[HubServer] = []
                    for user_model in items:
                        try:
                            servers = servers_from_user(user_model)
                        except (TypeError, ValueError, KeyError) as exc:
                            raise HubListingError(f"list active users: malformed user entry: {exc}") from None
                        name: str = user_model["name"]
                        if name in users_seen:
                            # the listing shifted between pages (a user started a server meanwhile)
                            log.info("hub listed user %r twice (listing shifted); keeping the first", name)
                            continue
                        users_seen.add(name)
                        page.extend(servers)
                    yield page
        except HubListingError:
            raise
        except HubError as exc:
            raise HubListingError(str(exc), status=exc.status) from None
        if len(totals) > 1:
            raise HubListingError(
                f"list active users: total changed during the listing ({sorted(totals)}); partial view"
            )
        if totals:
            (total,) = totals
            if total != len(users_seen):
                raise HubListingError(
                    f"list active users: received {len(users_seen)} users but the hub counts {total}; partial view"
                )

    async def list_active_servers(self) -> list[HubServer]:
        """The whole listing, or HubListingError."""
        out: list[HubServer] = []
        async for page in self.iter_active_servers():
            out.extend(page)
        return out

    async def get_server(self, user: str, server_name: str = "") -> HubServer | None:
        """Fresh view of one server from ``GET /users/NAME``; None if the user or server is gone
        (or the server is not running). Raises HubError when the hub cannot tell."""
        what = f"get server {user}/{server_name}" if server_name else f"get server {user}"
        answer = await self.api.call("GET", self.api.url("users", quote_segment(user)), what=what)
        if answer.status == 404:
            return None
        self.api.expect_ok(answer, what)
        model = self.api.json(answer, what)
        try:
            servers = servers_from_user(model)
        except (TypeError, ValueError, KeyError) as exc:
            raise HubError(f"{what}: malformed user model: {exc}") from None
        for server in servers:
            if server.name == server_name:
                return server
        return None

    # -- stop --------------------------------------------------------------------------------

    async def stop(self, user: str, server_name: str = "") -> StopResult:
        """Ask the hub to stop a server. Never raises: failures are ``StopResult("error", ...)``.

        204 -> stopped; 202 -> pending (the hub is still stopping it: re-check with get_server);
        404, or 400 saying "not running" -> gone; 403 -> refused (the hub will not let this token
        stop it; it does not change by asking again); anything else -> error.

        ``Authenticator.refresh_pre_stop`` (JupyterHub 5.4 and 6.x, measured on both): when the
        user's auth is stale, a service's or admin's stop goes ahead (204; the hub logs "Stopping
        anyway"), the user's own token is refused (403; on 6.x only with
        ``auth_refresh_strict``); when the authenticator's refresh itself fails (its identity
        provider unreachable), every stop answers 500 until it works again.
        """
        label = f"{user}/{server_name}" if server_name else user
        what = f"stop {label}"
        try:
            # A stop's DELETE lasts as long as the spawner takes to stop (Slurm: ~1 s): the hub is
            # waiting, not working, so stops have their own slots instead of holding hub-call slots.
            answer = await self.api.call("DELETE", self._server_path(user, server_name), what=what,
                                         seconds=self._stop_timeout, slots=self._stop_slots)
        except HubError as exc:
            detail = str(exc)
            if exc.status == 500:
                detail += (" (a hub with Authenticator.refresh_pre_stop answers 500 while the user's auth "
                           "cannot be refreshed: see the hub's log)")
            log.warning("%s failed: %s", what, detail)
            return StopResult("error", exc.status, detail)
        status = answer.status
        body = self.api.snippet(answer)
        if status == 204:
            return StopResult("stopped", status, "stopped")
        if status == 202:
            return StopResult("pending", status, "stop pending on the hub")
        if status == 404:
            return StopResult("gone", status, f"no such server ({body})" if body else "no such server")
        if status == 400 and "not running" in body.lower():
            return StopResult("gone", status, body)
        if status == 403:
            detail = (f"{what}: the hub refused the stop (HTTP 403 {body}): the reaper's token may not stop "
                      f"it (delete:servers), or the hub wants {user}'s login refreshed first "
                      "(Authenticator.refresh_pre_stop)").replace("  ", " ")
            log.warning("%s", detail)
            return StopResult("refused", status, detail)
        detail = f"{what}: HTTP {status} {body}".rstrip()
        log.warning("%s", detail)
        return StopResult("error", status, detail)

    # -- server addresses --------------------------------------------------------------------

    async def refresh_targets(self) -> int:
        """Fetch and cache the proxy table for this sweep's probes; returns how many servers it
        routes. Never raises: on failure the cache is empty and probes without another address
        fail with the reason."""
        return await self.routes.refresh()

    async def target_for(self, server: HubServer) -> str | None:
        """The server's own address: HubServer.target, spawner state's server_url, proxy table."""
        return await self.routes.target_for(server)

    # -- probes ------------------------------------------------------------------------------

    async def probe(self, server: HubServer, *, status: Probe | None = None) -> Probe:
        """Ask the single-user server about itself. NEVER raises.

        ``status``: a successful :meth:`probe_status` answer of this sweep, whose /api/status is
        then not asked again (a server detached at its last look whose status moved: 2 requests
        instead of 3 for the full look that follows)."""
        try:
            async with self._probe_slots:
                return await self._probe(server, known=status if status is not None and status.ok else None)
        except Exception as exc:  # belt and braces: a probe must never break a sweep
            log.exception("probe of %s crashed", server.label)
            return self._crashed(exc)

    async def probe_status(self, server: HubServer) -> Probe:
        """Only ``/api/status`` (one request): enough to tell whether anything happened since a
        full probe (its last_activity counts kernels, terminals and browser requests). ``kernels``
        is left empty; ``status_kernels`` carries the count. NEVER raises."""
        via = self.probes.via
        try:
            async with self._probe_slots:
                base = await self._base(server)
                if isinstance(base, Probe):
                    return base
                try:
                    answer = await self._get(base + "api/status", "status", last=True)
                except ProbeFailure as exc:
                    return Probe.failed(str(exc), via=via)
                return probe_from_status(answer, via=via)
        except Exception as exc:
            log.exception("status probe of %s crashed", server.label)
            return self._crashed(exc)

    async def activity(self, server: HubServer) -> Work:
        """The companion extension's report of what the job runs (``GET api/reaper/activity``, one
        request, as the probes: the server's own address, the probe token, ?no_track_activity=1).
        ``companion`` is "ok", "absent" (a 404: no companion installed there) or the reason it
        failed (timeout, HTTP error, malformed report). NEVER raises."""
        try:
            async with self._probe_slots:
                base = await self._base(server)
                if isinstance(base, Probe):
                    return Work(companion=base.error or "no server address")
                try:
                    answer = await self._get(base + "api/reaper/activity", "activity", missing_ok=True, last=True)
                    if answer is None:
                        return Work(companion="absent")
                    return Work(programs=parse_activity(answer), companion="ok")
                except ProbeFailure as exc:
                    return Work(companion=str(exc))
        except Exception as exc:
            log.exception("activity request to %s crashed", server.label)
            return Work(companion=f"crashed: {type(exc).__name__}: {self.api.redact(str(exc))}")

    async def call_server(self, server: HubServer, method: str, path: str,
                          body: Any = None) -> tuple[int | None, Any]:
        """One request to the single-user server itself (as the probes reach it: its own address,
        the service's token, ``?no_track_activity=1``), e.g. the companion's ``api/reaper/notice``.
        Returns (HTTP status, parsed JSON or None) or (None, why no answer). NEVER raises."""
        try:
            base = await self._base(server)
            if isinstance(base, Probe):
                return None, base.error
            data = None if body is None else json.dumps(body).encode()
            headers = {**self._probe_closing, "Content-Type": "application/json"} if data else self._probe_closing
            answer = await self._probe_transport.send(method, f"{base}{path}?{_NO_TRACK_QUERY}", headers, data,
                                                      self.probes.timeout)
        except TransportFailure as exc:
            return None, f"{exc.kind} ({self.api.redact(str(exc))[:100]})"
        except Exception as exc:  # a notice must never break the outbox
            return None, f"{type(exc).__name__}: {self.api.redact(str(exc))[:100]}"
        try:
            return answer.status, answer.json()
        except ValueError:
            return answer.status, None

    def _crashed(self, exc: Exception) -> Probe:
        return Probe.failed(f"probe crashed: {type(exc).__name__}: {self.api.redact(str(exc))}", via=self.probes.via)

    async def _base(self, server: HubServer) -> str | Probe:
        """The URL the server's API paths hang from, or the failed probe that says why none."""
        via = self.probes.via
        path = url_path(server.url)
        if not path:
            return Probe.failed("no server url on the hub", via=via)
        if not path.endswith("/"):
            path += "/"
        if via == "proxy":
            base = server.url if "://" in server.url else f"{self.public_url}{path}"
            return base if base.endswith("/") else base + "/"
        target = await self.routes.target_for(server)
        if not target:
            why = f"; proxy table: {self.routes.error}" if self.routes.error else ""
            return Probe.failed(
                f"no server address (no target, no server_url in state, no proxy route for {path}){why}", via=via
            )
        return target.rstrip("/") + path

    async def _probe(self, server: HubServer, *, known: Probe | None) -> Probe:
        via = self.probes.via
        base = await self._base(server)
        if isinstance(base, Probe):
            return base
        # /api/status and /api/terminals at once; /api/kernels only when the status counts kernels
        asks: list[Any] = [] if known is not None else [self._get(base + "api/status", "status")]
        if self.probes.terminals:
            asks.append(self._get(base + "api/terminals", "terminals", missing_ok=True, last=True))
        results = list(await asyncio.gather(*asks, return_exceptions=True))
        if known is not None:  # this sweep's /api/status answer, as the server gave it
            results.insert(0, status_answer(known))
        status = results[0]
        kernels: Any = []
        if needs_kernels(status):
            try:
                kernels = await self._get(base + "api/kernels", "kernels", last=True)
            except ProbeFailure as exc:
                kernels = exc
        results.append(kernels)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, ProbeFailure):
                raise r
        errors = [str(r) for r in results if isinstance(r, ProbeFailure)]
        if errors:
            return Probe.failed("; ".join(errors), via=via)
        terminals = results[1] if self.probes.terminals else []
        return probe_from_answers(status, kernels, terminals, via=via)

    async def _get(self, url: str, what: str, *, missing_ok: bool = False, last: bool = False) -> Any:
        """GET one probe URL with ?no_track_activity=1. Returns parsed JSON (None for a 404 when
        missing_ok); raises ProbeFailure('<what>: <reason>').

        ``last``: no other request of this probe will use the connection, so a direct probe closes
        it after the answer (``Connection: close``) instead of idling in the pool: a sweep talks to
        each server once, and thousands of idle sockets would hold file descriptors and memory."""
        headers = self._probe_closing if last else self._probe_headers
        target = url + ("&" if "?" in url else "?") + _NO_TRACK_QUERY
        seconds = self.probes.timeout
        reason = ""
        for attempt in range(self._probe_retries + 1):
            try:
                answer = await self._probe_transport.send("GET", target, headers, None, seconds)
            except TransportTimeout:
                reason = f"{what}: timeout after {seconds:g}s"
            except TransportFailure as exc:
                reason = f"{what}: {exc.kind}"
                detail = self.api.redact(str(exc))
                if detail:
                    reason += f" ({detail[:100]})"
            else:
                done, value = read_answer(what, answer.status, answer.content, missing_ok=missing_ok)
                if done:
                    return value
                reason = value
            if attempt < self._probe_retries:
                await asyncio.sleep(backoff_delay(self.options.backoff, 0) / 2)
        raise ProbeFailure(reason)
