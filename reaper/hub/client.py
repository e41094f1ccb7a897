"""Async JupyterHub REST client: list running servers, probe them, stop them.

Requests go straight through aiohttp (``reaper.aiohttp_transport``): one keep-alive pool for the hub
API, one for the single-user servers. ``http="httpx"`` (or an httpx ``transport``, as the respx tests
give) sends the same requests through httpx instead; httpx is imported only then.

Hub calls (listing, proxy table, stop, re-check) are retried with exponential backoff and
jitter on connection errors, timeouts, 5xx and 429; 4xx answers are never retried. Probes of
single-user servers are retried at most once and never raise: every failure becomes
``Probe.failed("<what>: <why>")``.

Probing without creating activity (see STACK.md): every probe carries ``?no_track_activity=1``
and, by default, goes to the server's own address (``probe_via="direct"``), because requests
through configurable-http-proxy are recorded as activity by the proxy itself. The address comes
from ``HubServer.target``, else the spawner state's ``server_url``, else the hub's proxy table
(``GET /hub/api/proxy``, cached per sweep by :meth:`HubClient.refresh_targets`).
``probe_via="proxy"`` (opt-in) sends the same paths to ``public_url``: simpler network-wise, but
the proxy then keeps every probed server "active" on the hub.

Listing contract: :meth:`HubClient.iter_active_servers` streams one list per page so that a sweep
may start probing early, but it raises :class:`HubListingError` if any page fails or the pages do
not add up to the hub's total. A caller must not act (notify, stop) on anyone until the iterator
has finished without error.

The token is sent as ``Authorization: token ...`` and never appears in logs or exception text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlencode, urlsplit

from .aiohttp_transport import AiohttpSender, TransportFailure, TransportTimeout

if TYPE_CHECKING:
    import httpx


from reaper.core.model import HubServer, Kernel, Probe

log = logging.getLogger(__name__)

PAGINATION_MEDIA_TYPE = "application/jupyterhub-pagination+json"
NO_TRACK = {"no_track_activity": "1"}
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_BODY_SNIPPET = 200


class HubError(Exception):
    """A hub API call failed (after retries, where retrying made sense)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class HubListingError(HubError):
    """The active-user listing failed or was partial: the sweep must act on nobody."""


@dataclass(frozen=True)
class StopResult:
    outcome: Literal["stopped", "pending", "gone", "error"]
    status: int | None
    detail: str

    @property
    def ok(self) -> bool:
        """True when the server is stopped, stopping, or already gone."""
        return self.outcome != "error"


class _ProbeFailure(Exception):
    """Internal: one probe request failed; the message is the short reason."""


def quote_segment(value: str) -> str:
    """Quote one path segment the way JupyterHub does (``url_escape_path``): '/' becomes %2F."""
    return quote(value, safe="@~")


def parse_time(value: Any) -> datetime | None:
    """ISO-8601 (with 'Z' or an offset) -> aware UTC datetime; None stays None.

    Raises ValueError for anything else, so that malformed data is never taken for "no activity".
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"not a timestamp: {value!r}")
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def _url_path(url: str) -> str:
    """The path part of a server url (a full URL when the hub uses subdomains)."""
    if "://" in url:
        return urlsplit(url).path or "/"
    return url


def server_from_model(user_model: Mapping[str, Any], name: str, model: Mapping[str, Any]) -> HubServer:
    """One hub server model (an entry of a user model's ``servers``) -> HubServer.

    Raises ValueError / TypeError / KeyError on malformed data.
    """
    user = user_model["name"]
    if not isinstance(user, str):
        raise TypeError(f"user name is not a string: {user!r}")
    state = model.get("state") or {}
    if not isinstance(state, dict):
        raise TypeError(f"server state of {user}/{name} is not an object")
    user_options = model.get("user_options") or {}
    if not isinstance(user_options, dict):
        raise TypeError(f"user_options of {user}/{name} is not an object")
    groups = user_model.get("groups") or []
    if not isinstance(groups, list):
        raise TypeError(f"groups of {user} is not a list")
    pending = model.get("pending")
    server_url = state.get("server_url")
    target = (
        server_url if isinstance(server_url, str) and server_url.startswith(("http://", "https://")) else None
    )
    return HubServer(
        user=user,
        name=str(model.get("name", name) or ""),
        started=parse_time(model.get("started")),
        last_activity=parse_time(model.get("last_activity")),
        ready=bool(model.get("ready", False)),
        pending=str(pending) if pending is not None else None,
        url=str(model.get("url") or ""),
        user_options=dict(user_options),
        state=dict(state),
        groups=tuple(str(g) for g in groups),
        admin=bool(user_model.get("admin", False)),
        target=target,
    )


def servers_from_user(user_model: Mapping[str, Any]) -> list[HubServer]:
    """Every running server (default and named) of one user model.

    A server the hub marks ``stopped: true`` (only listed with include_stopped_servers) is not
    running and is left out; a pending one is kept (the core decides what to do with it).
    """
    if not isinstance(user_model, Mapping) or not isinstance(user_model.get("name"), str):
        raise TypeError("user entry without a name")
    servers = user_model.get("servers")
    if not isinstance(servers, dict):
        raise TypeError(
            f"user {user_model['name']!r} has no 'servers' object (does the token have read:servers?)"
        )
    out: list[HubServer] = []
    for name, model in servers.items():
        if not isinstance(model, dict):
            raise TypeError(f"server {user_model['name']}/{name} is not an object")
        if model.get("stopped") is True:
            log.debug("hub lists %s/%s as stopped; not a running server", user_model["name"], name)
            continue
        out.append(server_from_model(user_model, name, model))
    return out


def _kernel(model: Any) -> Kernel:
    if not isinstance(model, dict):
        raise TypeError("kernel is not an object")
    kid, name, state = model.get("id"), model.get("name"), model.get("execution_state")
    if not isinstance(kid, str) or not isinstance(state, str):
        raise TypeError("kernel without id or execution_state")
    conns = model.get("connections", 0)
    if not isinstance(conns, int) or isinstance(conns, bool):
        raise TypeError("kernel connections is not an integer")
    return Kernel(
        id=kid,
        name=str(name or ""),
        execution_state=state,
        connections=conns,
        last_activity=parse_time(model.get("last_activity")),
    )


class HubClient:
    """Async client for the JupyterHub REST API and the single-user servers behind it.

    ``api_url`` is the hub API root, e.g. ``http://127.0.0.1:8081/hub/api``; ``public_url`` is
    the proxy's public root (``http://hub.example.org``), used only with ``probe_via="proxy"``.
    ``probe_token`` (optional) is sent to single-user servers instead of ``token``: give it only
    ``access:servers`` so that a compromised user server never sees the admin token.
    """

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        public_url: str | None = None,
        probe_via: Literal["direct", "proxy"] = "direct",
        timeout: float = 10.0,
        probe_timeout: float = 5.0,
        stop_timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        probe_retries: int = 1,
        hub_concurrency: int = 4,
        probe_concurrency: int = 32,
        stop_concurrency: int = 8,
        page_size: int = 200,
        probe_terminals: bool = True,
        probe_token: str | None = None,
        http: Literal["aiohttp", "httpx"] = "aiohttp",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if probe_via not in ("direct", "proxy"):
            raise ValueError(f"probe_via must be 'direct' or 'proxy', not {probe_via!r}")
        if probe_via == "proxy" and not public_url:
            raise ValueError("probe_via='proxy' needs public_url")
        if not token:
            raise ValueError("a hub API token is required")
        if page_size < 1 or hub_concurrency < 1 or probe_concurrency < 1 or retries < 0:
            raise ValueError("page_size and concurrencies must be >= 1, retries >= 0")
        self.api_url = api_url.rstrip("/")
        self.public_url = public_url.rstrip("/") if public_url else None
        self.probe_via: Literal["direct", "proxy"] = probe_via
        self.timeout = timeout
        self.probe_timeout = probe_timeout
        self.stop_timeout = max(stop_timeout, timeout)
        self.retries = retries
        self.backoff = backoff
        self.probe_retries = min(max(probe_retries, 0), 1)
        self.page_size = page_size
        self.probe_terminals = probe_terminals
        self._token = token
        self._probe_token = probe_token or token
        self._hub_sem = asyncio.Semaphore(hub_concurrency)
        self._probe_sem = asyncio.Semaphore(probe_concurrency)
        # A stop's DELETE lasts as long as the spawner takes to stop (Slurm: ~1 s): the hub is
        # waiting, not working, so stops have their own limit instead of holding hub-call slots.
        self._stop_sem = asyncio.Semaphore(max(stop_concurrency, 1))
        # the page's login calls: never the sweep's slots (reaper.web.login admits at most 2 at once)
        self._login_sem = asyncio.Semaphore(2)
        # Hub calls: one small keep-alive pool to one host.
        hub_conns = hub_concurrency + max(stop_concurrency, 1) + 2
        probe_conns = (3 if probe_terminals else 2) * probe_concurrency
        self._client: Any = None  # httpx clients: only with hub.http "httpx" or a given transport
        self._probe_client: Any = None
        self._hub_aiohttp: AiohttpSender | None = None  # the default: straight through aiohttp
        self._probe_aiohttp: AiohttpSender | None = None
        self._close_after_probe = probe_via == "direct"
        if transport is None and http == "aiohttp":
            # httpx's pool scans every connection twice per request, and its Request/Response
            # objects cost more CPU than a call itself: with dozens of stops in flight and
            # thousands of probes a sweep, aiohttp does the same for a fraction.
            self._hub_aiohttp = AiohttpSender(limit=hub_conns, limit_per_host=hub_conns)
            if probe_via == "direct":
                # One host per server, asked once a sweep: its connection lives for one probe
                # (status then kernels) and is closed after (see _probe_get).
                self._probe_aiohttp = AiohttpSender(limit=probe_conns, keepalive_timeout=1.0)
            else:  # every probe goes to the proxy: one keep-alive pool to it
                self._probe_aiohttp = AiohttpSender(limit=probe_conns, limit_per_host=probe_conns)
            self._timeouts: tuple[type[BaseException], ...] = (TransportTimeout,)
            self._failures: tuple[type[BaseException], ...] = (TransportFailure,)
        else:
            import httpx

            from .httpx_pool import PerHostTransport

            self._timeouts, self._failures = (httpx.TimeoutException,), (httpx.TransportError,)
            self._client = httpx.AsyncClient(
                transport=transport,
                limits=httpx.Limits(max_connections=hub_conns, max_keepalive_connections=hub_conns),
                timeout=httpx.Timeout(timeout),
                follow_redirects=False,
            )
            # Probes: one host per server. httpx scans its whole idle pool on every request, so
            # a pool holding thousands of servers' connections costs more CPU than the probes
            # themselves: one tiny pool per server address instead.
            probe_transport = transport
            if probe_transport is None and probe_via == "direct":
                probe_transport = PerHostTransport(per_host=2, max_hosts=2 * probe_concurrency)
            self._probe_client = httpx.AsyncClient(
                transport=probe_transport,
                limits=httpx.Limits(max_connections=probe_conns, max_keepalive_connections=probe_concurrency),
                timeout=httpx.Timeout(probe_timeout),
                follow_redirects=False,
            )
        self._targets: dict[str, str] | None = None
        self._targets_by_server: dict[tuple[str, str], str] = {}
        self._targets_error: str | None = None
        self._targets_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> HubClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for c in (self._client, self._probe_client, self._hub_aiohttp, self._probe_aiohttp):
            if c is not None:
                await c.aclose()

    def __repr__(self) -> str:  # never shows the token
        return f"HubClient(api_url={self.api_url!r}, probe_via={self.probe_via!r})"

    # -- helpers -----------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        for secret in {self._token, self._probe_token}:
            if secret:
                text = text.replace(secret, "***")
        return text

    def _snippet(self, response: httpx.Response) -> str:
        try:
            body = response.text
        except Exception:  # pragma: no cover - undecodable body
            return ""
        body = " ".join(body.split())[:_BODY_SNIPPET]
        return self._redact(body)

    def _api(self, *segments: str) -> str:
        return self.api_url + "/" + "/".join(segments)

    def _server_path(self, user: str, server_name: str) -> str:
        if server_name:
            return self._api("users", quote_segment(user), "servers", quote_segment(server_name))
        return self._api("users", quote_segment(user), "server")

    def _delay(self, attempt: int) -> float:
        return float(self.backoff * (2**attempt) * random.uniform(0.5, 1.5))

    async def _hub_request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        request_timeout: float | None = None,
        sem: asyncio.Semaphore | None = None,
        body: bytes | None = None,
        retries: int | None = None,
    ) -> httpx.Response:
        """One hub call with retries. Returns any non-retryable answer (2xx/3xx/4xx) to the caller;
        raises HubError when retryable failures (transport errors, 5xx, 429) outlast the retries."""
        hdrs = {"Authorization": f"token {self._token}", "Accept": "application/json"}
        if headers:
            hdrs.update(headers)
        last = ""
        status: int | None = None
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(self._delay(attempt - 1))
            try:
                async with sem or self._hub_sem:
                    if self._hub_aiohttp is not None:
                        # httpx's Request/Response objects cost more CPU than the call itself
                        full = url + ("?" + urlencode(params) if params else "")
                        code, content = await self._hub_aiohttp.send_raw(
                            method, full, hdrs, seconds=request_timeout or self.timeout, body=body
                        )
                        response = _Answer(code, content)  # type: ignore[assignment]
                    else:
                        response = await self._client.request(
                            method, url, params=params, headers=hdrs, content=body,
                            timeout=request_timeout or self.timeout,
                        )
            except self._timeouts:
                last, status = f"timeout after {request_timeout or self.timeout:g}s", None
            except self._failures as exc:
                last, status = f"{_failure_name(exc)}: {self._redact(str(exc))}", None
            else:
                if response.status_code not in _RETRY_STATUSES:
                    return response
                status = response.status_code
                last = f"HTTP {status} {self._snippet(response)}".rstrip()
            log.warning("hub %s: %s (attempt %d of %d)", what, last, attempt + 1, retries + 1)
        raise HubError(f"{what}: {last} after {retries + 1} attempts", status=status)

    def _json(self, response: httpx.Response, what: str) -> Any:
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HubError(
                f"{what}: invalid JSON ({exc.__class__.__name__})", status=response.status_code
            ) from None

    def _expect_ok(self, response: httpx.Response, what: str) -> None:
        if response.status_code != 200:
            raise HubError(
                f"{what}: HTTP {response.status_code} {self._snippet(response)}".rstrip(),
                status=response.status_code,
            )

    async def _paginated(
        self, path: str, what: str, params: Mapping[str, str] | None = None
    ) -> AsyncIterator[tuple[Any, int | None]]:
        """Yield (items, total) per page of a paginated hub collection; follows `_pagination.next`.

        ``items`` is whatever the hub puts there (a list of users, a dict of routes). For a hub
        that answers without the pagination envelope, yields (answer, None) for each offset until
        a page brings nothing new.
        """
        offset, limit = 0, self.page_size
        seen_plain: set[str] = set()
        while True:
            query: dict[str, str | int] = dict(params or {})
            query.update(offset=offset, limit=limit)
            response = await self._hub_request(
                "GET",
                path,
                what=f"{what} (offset {offset})",
                params=query,
                headers={"Accept": PAGINATION_MEDIA_TYPE},
            )
            self._expect_ok(response, f"{what} (offset {offset})")
            data = self._json(response, f"{what} (offset {offset})")
            if isinstance(data, dict) and "_pagination" in data and "items" in data:
                pagination = data["_pagination"]
                if not isinstance(pagination, dict):
                    raise HubError(f"{what}: malformed _pagination")
                total = pagination.get("total")
                yield data["items"], total if isinstance(total, int) else None
                nxt = pagination.get("next")
                if not nxt:
                    return
                if not isinstance(nxt, dict) or not isinstance(nxt.get("offset"), int):
                    raise HubError(f"{what}: malformed _pagination.next")
                new_offset = nxt["offset"]
                if new_offset <= offset:
                    raise HubError(f"{what}: _pagination.next does not advance ({offset} -> {new_offset})")
                offset = new_offset
                if isinstance(nxt.get("limit"), int) and nxt["limit"] > 0:
                    limit = nxt["limit"]
                continue
            # Plain answer (older hubs, or pagination not understood): walk offsets until a
            # page is empty or brings nothing new (a hub that ignores offset repeats itself).
            keys = _plain_keys(data)
            if keys is None:
                raise HubError(f"{what}: unexpected answer (neither a list nor a paginated object)")
            new = keys - seen_plain
            if not new:
                return
            seen_plain |= keys
            yield data, None
            offset += len(data)

    # -- listing -----------------------------------------------------------------------------

    async def iter_active_servers(self) -> AsyncIterator[list[HubServer]]:
        """One list of HubServer per page of ``GET /users?state=active``.

        Raises HubListingError if a page fails after retries, if an entry is malformed, or if
        the number of users received disagrees with the hub's total. Do not act on anyone
        before the iteration completes.
        """
        users_seen: set[str] = set()
        totals: set[int] = set()
        pages = self._paginated(self._api("users"), "list active users", {"state": "active"})
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
        response = await self._hub_request("GET", self._api("users", quote_segment(user)), what=what)
        if response.status_code == 404:
            return None
        self._expect_ok(response, what)
        model = self._json(response, what)
        try:
            servers = servers_from_user(model)
        except (TypeError, ValueError, KeyError) as exc:
            raise HubError(f"{what}: malformed user model: {exc}") from None
        for server in servers:
            if server.name == server_name:
                return server
        return None

    # -- the page's login (the hub's OAuth, see reaper.web.login) ------------------------------

    async def identify(self, token: str) -> dict[str, Any] | None:
        """The hub's model of whoever holds ``token`` (``GET /user`` with that token): name, kind,
        admin, groups, scopes. None when the hub does not know the token (401/403). Raises
        HubError when the hub cannot tell (a 404 included: a wrong API address)."""
        what = "identify a login token"
        # a short timeout and one retry: a visitor waits for the answer. The page's calls go
        # through their own semaphore, never the sweep's (how many at once: reaper.web.login)
        response = await self._hub_request(
            "GET", self._api("user"), what=what, headers={"Authorization": f"token {token}"},
            sem=self._login_sem, retries=min(self.retries, 1), request_timeout=min(self.timeout, 5.0),
        )
        if response.status_code in (401, 403):  # the hub's answer for a token it does not know
            return None
        self._expect_ok(response, what)
        model = self._json(response, what)
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            raise HubError(f"{what}: the hub's answer is not a user model")
        return model

    async def oauth_token(self, *, client_id: str, code: str, redirect_uri: str, code_verifier: str) -> str:
        """Trade an OAuth code for the user's access token (``POST /oauth2/token``; the service's
        own API token is its client secret). Asked once: a code is good for one trade only."""
        what = "trade the login code for a token"
        form = urlencode({
            "client_id": client_id,
            "client_secret": self._token,
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }).encode()
        response = await self._hub_request(
            "POST", self._api("oauth2", "token"), what=what, body=form, retries=0, sem=self._login_sem,
            headers={"Content-Type": "application/x-www-form-urlencoded"}, request_timeout=min(self.timeout, 5.0),
        )
        self._expect_ok(response, what)
        answer = self._json(response, what)
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise HubError(f"{what}: no access_token in the hub's answer")
        return token

    # -- stop --------------------------------------------------------------------------------

    async def stop(self, user: str, server_name: str = "") -> StopResult:
        """Ask the hub to stop a server. Never raises: failures are ``StopResult("error", ...)``.

        204 -> stopped; 202 -> pending (the hub is still stopping it: re-check with get_server);
        404, or 400 saying "not running" -> gone.
        """
        label = f"{user}/{server_name}" if server_name else user
        what = f"stop {label}"
        try:
            response = await self._hub_request(
                "DELETE", self._server_path(user, server_name), what=what, request_timeout=self.stop_timeout,
                sem=self._stop_sem,
            )
        except HubError as exc:
            log.warning("%s failed: %s", what, exc)
            return StopResult("error", exc.status, str(exc))
        status = response.status_code
        body = self._snippet(response)
        if status == 204:
            return StopResult("stopped", status, "stopped")
        if status == 202:
            return StopResult("pending", status, "stop pending on the hub")
        if status == 404:
            return StopResult("gone", status, f"no such server ({body})" if body else "no such server")
        if status == 400 and "not running" in body.lower():
            return StopResult("gone", status, body)
        detail = f"{what}: HTTP {status} {body}".rstrip()
        log.warning("%s", detail)
        return StopResult("error", status, detail)

    # -- proxy table -------------------------------------------------------------------------

    async def proxy_targets(self) -> dict[str, str]:
        """routespec ('/user/alice/') -> target ('http://127.0.0.1:54321') from ``GET /proxy``.

        Needs the ``proxy`` scope. Raises HubError on failure. The hub fetches the whole table
        from the proxy for every page, so pages are as large as page_size allows.
        """
        targets, _by_server = await self._proxy_table()
        return targets

    async def _proxy_table(self, *, user_routes: bool = True) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
        """(routespec -> target, (user, server name) -> target). ``user_routes=False`` leaves the
        routes that name their server out of the first map: the second finds those, and a big
        hub's table is then held once, not twice."""
        targets: dict[str, str] = {}
        by_server: dict[tuple[str, str], str] = {}
        pages = self._paginated(self._api("proxy"), "proxy table")
        async with aclosing(pages):
            async for items, _total in pages:
                if not isinstance(items, dict):
                    raise HubError("proxy table: routes are not an object")
                for routespec, route in items.items():
                    if not isinstance(route, dict) or not isinstance(route.get("target"), str):
                        continue
                    target = route["target"]
                    data = route.get("data") or {}
                    if isinstance(data, dict) and isinstance(data.get("user"), str):
                        by_server[(data["user"], str(data.get("server_name") or ""))] = target
                        if not user_routes:
                            continue
                    targets[str(routespec)] = target
        return targets, by_server

    async def refresh_targets(self) -> int:
        """Fetch and cache the proxy table for this sweep's probes; returns how many servers it
        routes. Never raises: on failure the cache is empty and probes without another address
        fail with the reason."""
        async with self._targets_lock:
            try:
                self._targets, self._targets_by_server = await self._proxy_table(user_routes=False)
                self._targets_error = None
            except HubError as exc:
                self._targets, self._targets_by_server = {}, {}
                self._targets_error = str(exc)
                log.warning("proxy table unavailable: %s", exc)
            return len(self._targets_by_server)

    async def target_for(self, server: HubServer) -> str | None:
        """The server's own address: HubServer.target, spawner state's server_url, proxy table."""
        if server.target:
            return server.target
        url = server.state.get("server_url") if isinstance(server.state, dict) else None
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            return url
        if self._targets is None:
            await self.refresh_targets()
        found = self._targets_by_server.get((server.user, server.name))
        if found:
            return found
        targets = self._targets or {}
        if server.url in targets:
            return targets[server.url]
        path = _url_path(server.url)
        if path in targets:
            return targets[path]
        # subdomain hubs: routespec is 'host/path/'
        host = urlsplit(server.url).netloc if "://" in server.url else ""
        if host and host + path in targets:
            return targets[host + path]
        return None

    # -- probes ------------------------------------------------------------------------------

    async def probe(self, server: HubServer, *, status: Probe | None = None) -> Probe:
        """Ask the single-user server about itself. NEVER raises.

        ``status``: a successful :meth:`probe_status` answer of this sweep, whose /api/status is
        then not asked again (a server detached at its last look whose status moved: 2 requests
        instead of 3 for the full look that follows)."""
        via = self.probe_via
        try:
            async with self._probe_sem:
                return await self._probe(server, known=status if status is not None and status.ok else None)
        except Exception as exc:  # belt and braces: a probe must never break a sweep
            log.exception("probe of %s crashed", server.label)
            return Probe.failed(f"probe crashed: {type(exc).__name__}: {self._redact(str(exc))}", via=via)

    async def probe_status(self, server: HubServer) -> Probe:
        """Only ``/api/status`` (one request): enough to tell whether anything happened since a
        full probe (its last_activity counts kernels, terminals and browser requests). ``kernels``
        is left empty; ``status_kernels`` carries the count. NEVER raises."""
        try:
            async with self._probe_sem:
                return await self._probe(server, status_only=True)
        except Exception as exc:
            log.exception("status probe of %s crashed", server.label)
            return Probe.failed(f"probe crashed: {type(exc).__name__}: {self._redact(str(exc))}", via=self.probe_via)

    async def _probe(self, server: HubServer, *, status_only: bool = False, known: Probe | None = None) -> Probe:
        via = self.probe_via
        path = _url_path(server.url)
        if not path:
            return Probe.failed("no server url on the hub", via=via)
        if not path.endswith("/"):
            path += "/"
        if via == "proxy":
            base = server.url if "://" in server.url else f"{self.public_url}{path}"
            if not base.endswith("/"):
                base += "/"
        else:
            target = await self.target_for(server)
            if not target:
                why = f"; proxy table: {self._targets_error}" if self._targets_error else ""
                return Probe.failed(
                    f"no server address (no target, no server_url in state, no proxy route for {path}){why}",
                    via=via,
                )
            base = target.rstrip("/") + path

        # One request where one suffices: /api/status says how many kernels run; only when some
        # do is /api/kernels needed (their execution_state and connections).
        if status_only:
            try:
                st = await self._probe_get(base + "api/status", "status", last=True)
                if not isinstance(st, dict):
                    raise _ProbeFailure("status: unexpected answer (not an object)")
                n = st.get("kernels")
                c = st.get("connections", 0)
                return Probe(
                    ok=True,
                    status_last_activity=parse_time(st.get("last_activity")),
                    status_connections=c if isinstance(c, int) and not isinstance(c, bool) else 0,
                    status_kernels=n if isinstance(n, int) and not isinstance(n, bool) else None,
                    via=via,
                    status_started=_started(st),
                )
            except (_ProbeFailure, ValueError) as exc:
                return Probe.failed(str(exc), via=via)
        first: list[Any] = [] if known is not None else [self._probe_get(base + "api/status", "status")]
        if self.probe_terminals:
            first.append(self._probe_get(base + "api/terminals", "terminals", missing_ok=True, last=True))
        results = list(await asyncio.gather(*first, return_exceptions=True))
        if known is not None:  # this sweep's /api/status answer, as the server gave it
            results.insert(0, {
                "kernels": known.status_kernels,
                "connections": known.status_connections,
                "last_activity": known.status_last_activity.isoformat() if known.status_last_activity else None,
                "started": known.status_started.isoformat() if known.status_started else None,
            })
        status = results[0]
        kernel_count = status.get("kernels") if isinstance(status, dict) else None
        no_kernels = isinstance(kernel_count, int) and not isinstance(kernel_count, bool) and kernel_count == 0
        if isinstance(status, dict) and not no_kernels:
            try:
                results.append(await self._probe_get(base + "api/kernels", "kernels", last=True))
            except _ProbeFailure as exc:
                results.append(exc)
        else:
            results.append([])
        errors = [str(r) for r in results if isinstance(r, _ProbeFailure)]
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, _ProbeFailure):
                raise r
        if errors:
            return Probe.failed("; ".join(errors), via=via)
        kernels_raw = results[-1]
        terminals_raw = results[1] if self.probe_terminals else []
        try:
            if not isinstance(status, dict):
                raise _ProbeFailure("status: unexpected answer (not an object)")
            conns = status.get("connections", 0)
            if not isinstance(conns, int) or isinstance(conns, bool):
                raise _ProbeFailure("status: connections is not an integer")
            try:
                status_last = parse_time(status.get("last_activity"))
            except ValueError:
                raise _ProbeFailure("status: invalid last_activity") from None
            if not isinstance(kernels_raw, list):
                raise _ProbeFailure("kernels: unexpected answer (not a list)")
            try:
                kernels = tuple(_kernel(k) for k in kernels_raw)
            except (TypeError, ValueError) as exc:
                raise _ProbeFailure(f"kernels: malformed entry ({exc})") from None
            if terminals_raw is None:  # terminals API absent (404): none can run
                terminals_raw = []
            if not isinstance(terminals_raw, list):
                raise _ProbeFailure("terminals: unexpected answer (not a list)")
            try:
                term_times = [
                    parse_time(t.get("last_activity")) for t in terminals_raw if isinstance(t, dict)
                ]
            except ValueError:
                raise _ProbeFailure("terminals: invalid last_activity") from None
        except _ProbeFailure as exc:
            return Probe.failed(str(exc), via=via)
        known = [t for t in term_times if t is not None]
        return Probe(
            ok=True,
            status_last_activity=status_last,
            status_connections=conns,
            status_kernels=kernel_count if isinstance(kernel_count, int) and not isinstance(kernel_count, bool)
            else len(kernels),
            kernels=kernels,
            terminals=len(terminals_raw),
            terminals_last_activity=max(known) if known else None,
            via=via,
            status_started=_started(status),
        )

    async def _probe_get(self, url: str, what: str, *, missing_ok: bool = False, last: bool = False) -> Any:
        """GET one probe URL with ?no_track_activity=1. Returns parsed JSON (None for a 404 when
        missing_ok); raises _ProbeFailure('<what>: <reason>').

        ``last``: no other request of this probe will use the connection, so it is closed after
        the answer (``Connection: close``) instead of idling in the pool: a sweep talks to each
        server once, and thousands of idle sockets would hold file descriptors and memory."""
        headers = {"Authorization": f"token {self._probe_token}", "Accept": "application/json"}
        if last and self._close_after_probe:
            headers["Connection"] = "close"
        direct = self._probe_aiohttp
        if direct is not None:
            return await self._probe_get_aiohttp(direct, url, what, headers, missing_ok=missing_ok)
        reason = ""
        for attempt in range(self.probe_retries + 1):
            try:
                response = await self._probe_client.get(
                    url, params=NO_TRACK, headers=headers, timeout=self.probe_timeout
                )
            except self._timeouts:
                reason = f"{what}: timeout after {self.probe_timeout:g}s"
            except self._failures as exc:
                reason = f"{what}: {_failure_name(exc)}"
                detail = self._redact(str(exc))
                if detail:
                    reason += f" ({detail[:100]})"
            else:
                done, value = _probe_answer(what, response.status_code, response.content, missing_ok)
                if done:
                    return value
                reason = value
            if attempt < self.probe_retries:
                await asyncio.sleep(self._delay(0) / 2)
        raise _ProbeFailure(reason)

    async def _probe_get_aiohttp(
        self, transport: Any, url: str, what: str, headers: dict[str, str], *, missing_ok: bool
    ) -> Any:
        """The same GET straight through aiohttp: a probe is the sweep's most frequent request, and
        httpx's request/response objects cost more CPU than the request itself."""
        import aiohttp
        from yarl import URL

        target = URL(url + ("&" if "?" in url else "?") + "no_track_activity=1", encoded=True)
        timeout = aiohttp.ClientTimeout(total=self.probe_timeout)
        reason = ""
        for attempt in range(self.probe_retries + 1):
            try:
                async with transport._get_session().get(
                    target, headers=headers, timeout=timeout, allow_redirects=False
                ) as resp:
                    code = resp.status
                    body = await resp.read()
            except TimeoutError:
                reason = f"{what}: timeout after {self.probe_timeout:g}s"
            except aiohttp.ClientError as exc:
                kind = "ConnectError" if isinstance(exc, aiohttp.ClientConnectorError) else type(exc).__name__
                reason = f"{what}: {kind}"
                detail = self._redact(str(exc))
                if detail:
                    reason += f" ({detail[:100]})"
            else:
                done, value = _probe_answer(what, code, body, missing_ok)
                if done:
                    return value
                reason = value
            if attempt < self.probe_retries:
                await asyncio.sleep(self._delay(0) / 2)
        raise _ProbeFailure(reason)

    async def probe_many(self, servers: Iterable[HubServer]) -> list[Probe]:
        """Probe several servers concurrently (bounded by probe_concurrency), in order."""
        return list(await asyncio.gather(*(self.probe(s) for s in servers)))


def _failure_name(exc: BaseException) -> str:
    """httpx's name for a connection-level failure, on either path: "ConnectError", ..."""
    return getattr(exc, "kind", None) or type(exc).__name__


def _started(status: dict[str, Any]) -> datetime | None:
    """/api/status ``started`` (informational: a bad value is ignored, never a failed probe)."""
    try:
        return parse_time(status.get("started"))
    except (ValueError, TypeError):
        return None


class _Answer:
    """A hub answer read straight from aiohttp: what the hub client uses of an httpx.Response."""

    __slots__ = ("status_code", "content")

    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


def _probe_answer(what: str, code: int, body: bytes, missing_ok: bool) -> tuple[bool, Any]:
    """A probe's HTTP answer: (True, parsed JSON or None for a tolerated 404), or (False, the
    reason) for a 5xx worth one retry; raises _ProbeFailure for an answer not worth retrying."""
    if code == 200:
        try:
            return True, json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _ProbeFailure(f"{what}: invalid JSON") from None
    if code == 404 and missing_ok:
        return True, None
    reason = f"{what}: HTTP {code}"
    if code < 500:
        raise _ProbeFailure(reason)
    return False, reason


def _plain_keys(data: Any) -> set[str] | None:
    """Identities of the entries of a plain (non-paginated) hub answer."""
    if isinstance(data, list):
        keys: set[str] = set()
        for entry in data:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                keys.add(entry["name"])
            else:
                keys.add(json.dumps(entry, sort_keys=True, default=str))
        return keys
    if isinstance(data, dict):
        return {str(k) for k in data}
    return None
