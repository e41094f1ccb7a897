"""The page's login: the hub's OAuth flow, as JupyterHub's own ``HubOAuth`` does it.

Why not ``jupyterhub.services.auth``: it imports ``jupyterhub.scopes``, which imports JupyterHub's
ORM, and with it SQLAlchemy's ORM, alembic, mako and pygments: 18 MB a long-running service would
hold for a login (README, "Speed at scale"). The flow is short and the same here:

1. A visitor without a login is sent to the hub's ``/hub/api/oauth2/authorize`` with our client id,
   our callback, a fresh ``state`` and a PKCE challenge (S256). The state, the PKCE verifier and
   the page to come back to are kept in a signed, HttpOnly cookie that lives 10 minutes, one per
   login under way: nothing is kept in the service, so no flood of visitors can push a real login
   out.
2. The hub logs the user in and sends the browser to ``oauth_callback?code=...&state=...``. The
   state must be the one in this browser's cookie, then the code is traded for the user's token
   (``POST /hub/api/oauth2/token``, our API token as client secret, the PKCE verifier; a code is
   good once), the hub is asked who holds the token (``GET /hub/api/user``), and the token is kept
   in a signed, HttpOnly, SameSite=Lax cookie named after our client id, on our prefix only.
3. Each later request is identified by that cookie (or by ``Authorization: token ...``, for API
   clients), asking the hub who holds the token, with answers kept 60 s. A token the hub no longer
   knows (the user logged out of the hub) clears the cookie. The hub is asked through a few slots
   of the page's own, never the sweep's; a request that finds them busy for 5 s gets a 503.
4. Access needs a user (not a service) with one of the hub's access scopes for this service
   (``$JUPYTERHUB_OAUTH_ACCESS_SCOPES``, else ``access:services!service=<name>``).
5. Forms carry an xsrf token derived from the login token and the hub session (HMAC with the
   page's cookie secret): another user's token, or an ``_xsrf`` cookie set by a user server on the
   same domain, does not pass. Requests with a token in the Authorization header need none. As in
   JupyterHub, a cookie-authenticated read that a script made (``Sec-Fetch-Mode: cors``, or
   ``no-cors`` from another site) counts only with the xsrf token. Without per-user subdomains, a
   user's server shares the page's origin; JupyterHub documents the same limit.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlencode, urlparse

from tornado import web

if TYPE_CHECKING:
    from ..hub import HubAPI

log = logging.getLogger("reaper.web")

TOKEN_HEADER = re.compile(r"(?:token|bearer)\s+(\S+)\s*$", re.IGNORECASE)
SESSION_COOKIE = "jupyterhub-session-id"  # the hub's, on path /
# RFC 6749 4.1.2.1: the error codes an authorization answer may carry (anything else is "error")
OAUTH_ERRORS = frozenset({"invalid_request", "unauthorized_client", "access_denied", "unsupported_response_type",
                          "invalid_scope", "server_error", "temporarily_unavailable"})
MAX_CACHED = 10_000  # identities kept at once (each for cache_seconds)
HUB_SLOTS = 2  # the page's hub calls at once (the hub transport keeps as many connections for them)
HUB_WAIT = 5.0  # seconds a request waits for a slot before a 503


def pkce_pair() -> tuple[str, str]:
    """(verifier, S256 challenge), RFC 7636."""
    verifier = secrets.token_urlsafe(32)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


def scope_allows(required: Iterable[str], held: Iterable[str]) -> bool:
    """True when a held scope covers one of the required ones: the same scope, or its unfiltered
    base (``access:services`` covers ``access:services!service=reaper``; a filtered scope never
    covers the unfiltered one, nor another filter). The hub answers with expanded scopes."""
    have = set(held)
    return any(r in have or r.split("!", 1)[0] in have for r in required)


def browser_protocol(request: Any) -> str:
    """What the browser sees: the outermost Forwarded proto, X-Forwarded-Proto or X-Scheme, else
    the connection's (as JupyterHub's get_browser_protocol)."""
    forwarded = request.headers.get("Forwarded", "").split(",", 1)[0]
    for part in forwarded.split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() == "proto" and value.strip().strip('"').lower() in ("http", "https"):
            return value.strip().strip('"').lower()
    for header in ("X-Forwarded-Proto", "X-Scheme"):
        value = request.headers.get(header, "").split(",", 1)[0].strip().lower()
        if value in ("http", "https"):
            return value
    return str(request.protocol)


def script_read(request: Any) -> bool:
    """A read a script made, or a resource another site embeds: JupyterHub's ``_needs_check_xsrf``
    for GET/HEAD/OPTIONS (page views and same-origin images need no xsrf token; these do)."""
    mode = request.headers.get("Sec-Fetch-Mode", "unspecified")
    site = request.headers.get("Sec-Fetch-Site", "unspecified")
    if mode in ("navigate", "unspecified", "websocket"):
        return False
    return not (mode == "no-cors" and site == "same-origin")


class LoginHub(Protocol):
    """What the login asks of the hub (:class:`HubAuth` over HTTP; the tests' FakeHub from a table)."""

    async def identify(self, token: str) -> dict[str, Any] | None: ...

    async def oauth_token(self, *, client_id: str, code: str, redirect_uri: str, code_verifier: str) -> str: ...


class HubAuth:
    """The login's two hub calls, over the hub client's API (its transport, its pool): who holds a
    token, and the code trade, whose client secret is the service's own API token. Through slots of
    their own, never the sweep's; with a short timeout, as a visitor waits for the answer."""

    def __init__(self, api: HubAPI) -> None:
        self.api = api
        self._slots = asyncio.Semaphore(HUB_SLOTS)
        self._seconds = min(api.timeout, 5.0)

    async def identify(self, token: str) -> dict[str, Any] | None:
        """The hub's model of whoever holds ``token`` (``GET /user`` with that token): name, kind,
        admin, groups, scopes. None when the hub does not know the token (401/403). Raises
        HubError when the hub cannot tell (a 404 included: a wrong API address)."""
        from ..hub import HubError

        what = "identify a login token"
        answer = await self.api.call(
            "GET", self.api.url("user"), what=what, headers={"Authorization": f"token {token}"},
            slots=self._slots, retries=min(self.api.retries, 1), seconds=self._seconds,
        )
        if answer.status in (401, 403):  # the hub's answer for a token it does not know
            return None
        self.api.expect_ok(answer, what)
        model = self.api.json(answer, what)
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            raise HubError(f"{what}: the hub's answer is not a user model")
        return model

    async def oauth_token(self, *, client_id: str, code: str, redirect_uri: str, code_verifier: str) -> str:
        """Trade an OAuth code for the user's access token (``POST /oauth2/token``; the service's
        own API token is its client secret). Asked once: a code is good for one trade only."""
        from ..hub import HubError

        what = "trade the login code for a token"
        form = urlencode({
            "client_id": client_id,
            "client_secret": self.api.token,
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }).encode()
        answer = await self.api.call(
            "POST", self.api.url("oauth2", "token"), what=what, body=form, retries=0, slots=self._slots,
            headers={"Content-Type": "application/x-www-form-urlencoded"}, seconds=self._seconds,
        )
        self.api.expect_ok(answer, what)
        reply = self.api.json(answer, what)
        token = reply.get("access_token") if isinstance(reply, dict) else None
        if not isinstance(token, str) or not token:
            raise HubError(f"{what}: no access_token in the hub's answer")
        return token


class HubLogin:
    """Identify the page's visitors through the hub (see the module's docstring).

    ``hub`` answers ``identify(token)`` and ``oauth_token(client_id=, code=, redirect_uri=,
    code_verifier=)`` (:class:`HubAuth` does, over HTTP; the tests' FakeHub from a table).
    """

    def __init__(
        self,
        hub: LoginHub,
        *,
        prefix: str,
        client_id: str,
        authorize_url: str,
        redirect_uri: str,
        hub_home: str = "/hub/home",
        access_scopes: Iterable[str] = (),
        cookie_options: Mapping[str, Any] | None = None,
        secure: bool = False,
        cache_seconds: float = 60.0,
        state_seconds: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not client_id:
            raise ValueError("the hub's OAuth client id is empty (JUPYTERHUB_CLIENT_ID)")
        self.hub = hub
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.client_id = client_id
        self.authorize_url = authorize_url
        self.hub_home = hub_home  # the hub's home page, linked from the page's top bar
        self.redirect_uri = redirect_uri
        self.access_scopes = frozenset(access_scopes)
        self.cookie_options = dict(cookie_options or {})
        self.secure = secure
        self.cache_seconds = cache_seconds
        self.state_seconds = state_seconds
        self.clock = clock
        self.cookie_name = client_id
        self.state_cookie_name = client_id + "-oauth-state"
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._asking: dict[str, asyncio.Future[dict[str, Any] | None]] = {}  # one hub call per token
        self._slots: asyncio.Semaphore | None = None  # made in the running loop

    @classmethod
    def from_environment(cls, hub: LoginHub, prefix: str, env: Mapping[str, str] | None = None) -> HubLogin:
        """Configured as the hub configures a managed service (JUPYTERHUB_CLIENT_ID, ..._HOST,
        ..._BASE_URL, ..._OAUTH_CALLBACK_URL, ..._OAUTH_ACCESS_SCOPES, ..._SERVICE_NAME,
        ..._COOKIE_OPTIONS, ..._PUBLIC_URL)."""
        env = os.environ if env is None else env
        name = env.get("JUPYTERHUB_SERVICE_NAME", "") or "reaper"
        if env.get("JUPYTERHUB_COOKIE_HOST_PREFIX_ENABLED", "").lower() in ("1", "true", "yes"):
            log.warning("JUPYTERHUB_COOKIE_HOST_PREFIX_ENABLED: the page's cookies do not use the __Host- "
                        "prefix; they stay on the page's own path (%s)", prefix)
        base = "/" + env.get("JUPYTERHUB_BASE_URL", "/").strip("/")
        hub_prefix = base.rstrip("/") + "/hub/"
        raw_scopes = env.get("JUPYTERHUB_OAUTH_ACCESS_SCOPES") or env.get("JUPYTERHUB_OAUTH_SCOPES")
        # never empty: with no scope to require, every hub user would get in
        scopes = set(json.loads(raw_scopes) or ()) if raw_scopes else set()
        scopes = scopes or {f"access:services!service={name}"}
        public = env.get("JUPYTERHUB_PUBLIC_URL", "")
        return cls(
            hub,
            prefix=prefix,
            client_id=env.get("JUPYTERHUB_CLIENT_ID") or f"service-{name}",
            authorize_url=env.get("JUPYTERHUB_HOST", "") + hub_prefix + "api/oauth2/authorize",
            hub_home=env.get("JUPYTERHUB_HOST", "") + hub_prefix + "home",
            redirect_uri=env.get("JUPYTERHUB_OAUTH_CALLBACK_URL") or prefix.rstrip("/") + "/oauth_callback",
            access_scopes=scopes,
            cookie_options=json.loads(env["JUPYTERHUB_COOKIE_OPTIONS"]) if env.get("JUPYTERHUB_COOKIE_OPTIONS") else None,
            secure=urlparse(public).scheme == "https",
        )

    # ---- tokens in a request

    @staticmethod
    def header_token(handler: web.RequestHandler) -> str | None:
        m = TOKEN_HEADER.match(handler.request.headers.get("Authorization", ""))
        return m.group(1) if m else None

    def cookie_token(self, handler: web.RequestHandler) -> str | None:
        raw = handler.get_signed_cookie(self.cookie_name)
        return raw.decode("ascii", "replace") if raw else None

    @staticmethod
    def session_id(handler: web.RequestHandler) -> str:
        return handler.get_cookie(SESSION_COOKIE, "") or ""

    # ---- who is it

    async def identify(self, token: str, session_id: str = "") -> dict[str, Any] | None:
        """The hub's user model for a token, asked at most once per ``cache_seconds``."""
        key = hashlib.sha256(f"{session_id}\0{token}".encode("utf-8", "replace")).hexdigest()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > self.clock():
            return dict(hit[1]) if hit[1] is not None else None
        asking = self._asking.get(key)
        if asking is None:  # the first to ask: others with the same token wait for this answer
            asking = self._asking[key] = asyncio.ensure_future(self._ask_hub(self.hub.identify, token))
            asking.add_done_callback(lambda f: self._remember(key, f))
        model = await asyncio.shield(asking)
        return dict(model) if model is not None else None

    async def _ask_hub(self, call: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Every hub call of the page (who holds a token, the code trade) goes through its slots:
        anyone can make the page ask, so a visitor who waits HUB_WAIT for one gets a 503."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(HUB_SLOTS)
        try:
            await asyncio.wait_for(self._slots.acquire(), HUB_WAIT)
        except TimeoutError:
            raise web.HTTPError(503, "too many logins being checked with the hub; try again shortly") from None
        try:
            return await call(*args, **kw)
        finally:
            self._slots.release()

    def _remember(self, key: str, done: asyncio.Future[dict[str, Any] | None]) -> None:
        self._asking.pop(key, None)
        if done.cancelled() or done.exception() is not None:
            return  # not cached: the next request asks again
        now = self.clock()
        self._cache.pop(key, None)  # re-inserted last: the table drops the least recently asked
        self._cache[key] = (now + self.cache_seconds, done.result())
        _trim(self._cache, now, MAX_CACHED)

    def allowed(self, model: Mapping[str, Any]) -> bool:
        """A user (services use the hub's API, not this page) with this service's access scope."""
        if model.get("kind", "user") != "user":
            return False
        return not self.access_scopes or scope_allows(self.access_scopes, model.get("scopes") or ())

    async def user(self, handler: web.RequestHandler) -> dict[str, Any] | None:
        """Who sent this request: the token in its Authorization header if it has one (then only
        that), else the login cookie. None for nobody; HTTP 403 for someone the hub knows but
        who lacks this service's access scope."""
        session = self.session_id(handler)
        token = self.header_token(handler)
        if token is not None:
            model = await self._identify(token, session)
        else:
            token = self.cookie_token(handler)
            if not token:
                return None
            if handler.request.method in ("GET", "HEAD", "OPTIONS") and script_read(handler.request):
                if not self._xsrf_ok(handler):
                    log.info("a script's read with the login cookie but no xsrf token: served as to nobody")
                    return None
            model = await self._identify(token, session)
            if model is None:
                log.info("a login cookie's token is no longer known to the hub: cleared")
                self.clear_cookie(handler)
        if model is None:
            return None
        model.setdefault("kind", "user")
        if not self.allowed(model):
            log.warning("not allowed: %s %s (a service, or without the scope %s)", model["kind"],
                        model.get("name"), " or ".join(sorted(self.access_scopes)))
            raise web.HTTPError(403, "your hub account has no access to this page")
        return model

    async def _identify(self, token: str, session: str) -> dict[str, Any] | None:
        from ..hub import HubError

        try:
            return await self.identify(token, session)
        except HubError as e:
            log.warning("could not check a login with the hub: %s", e)
            raise web.HTTPError(502, "the hub did not answer the login check; try again shortly") from None

    # ---- xsrf

    def xsrf_token(self, handler: web.RequestHandler) -> bytes:
        """The token forms must carry: bound to this login and hub session, unforgeable without
        the page's cookie secret."""
        secret = handler.application.settings["cookie_secret"]
        key = hmac.new(secret if isinstance(secret, bytes) else secret.encode(), b"reaper-xsrf", "sha256").digest()
        login = hashlib.sha256((self.cookie_token(handler) or "").encode()).hexdigest()
        msg = f"{self.session_id(handler)}:{login}".encode()
        return hmac.new(key, msg, "sha256").hexdigest().encode()

    def check_xsrf(self, handler: web.RequestHandler) -> None:
        """Refuse a cookie-authenticated POST without this login's xsrf token (HTTP 403)."""
        if self.header_token(handler) is not None:
            return  # a browser never sends our Authorization header by itself
        if not self._given_xsrf(handler):
            raise web.HTTPError(403, "'_xsrf' argument missing from POST")
        if not self._xsrf_ok(handler):
            raise web.HTTPError(403, "XSRF token does not match this login")

    @staticmethod
    def _given_xsrf(handler: web.RequestHandler) -> str:
        return str(handler.get_argument("_xsrf", None) or handler.request.headers.get("X-Xsrftoken")
                   or handler.request.headers.get("X-Csrftoken") or "")

    def _xsrf_ok(self, handler: web.RequestHandler) -> bool:
        given = self._given_xsrf(handler)
        return bool(given and self.cookie_token(handler)
                    and hmac.compare_digest(given.encode(), self.xsrf_token(handler)))

    # ---- the OAuth dance

    def _cookie_kwargs(self, handler: web.RequestHandler) -> dict[str, Any]:
        kw: dict[str, Any] = {"path": self.prefix, "httponly": True, "samesite": "Lax"}
        if self.secure or browser_protocol(handler.request) == "https":
            kw["secure"] = True
        return kw

    def login_url(self, handler: web.RequestHandler) -> str:
        """The hub's authorize URL for this visitor; sets the state cookie, which carries all the
        login needs later (nothing is kept in the service)."""
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(16)
        uri = handler.request.uri or self.prefix
        next_url = uri if uri.startswith(self.prefix) and not uri.startswith("//") else self.prefix
        value = json.dumps({"s": state, "v": verifier, "n": next_url, "e": self.clock() + self.state_seconds})
        # the admin's cookie options apply (e.g. samesite, domain), never to its lifetime, path or flags
        extra = {k: v for k, v in self.cookie_options.items()
                 if k.lower() not in ("path", "httponly", "secure", "max_age", "expires", "expires_days")}
        handler.set_signed_cookie(self._state_cookie(state), value, expires_days=None,
                                  max_age=int(self.state_seconds), **{**self._cookie_kwargs(handler), **extra})
        query = urlencode({
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "response_type": "code",
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        })
        return f"{self.authorize_url}?{query}"

    def _state_cookie(self, state: str) -> str:
        # one cookie per login under way: two tabs logging in at once do not undo each other
        return f"{self.state_cookie_name}-{hashlib.sha256(state.encode()).hexdigest()[:12]}"

    def _clear(self, handler: web.RequestHandler, name: str) -> None:
        domain = self.cookie_options.get("domain")  # a cookie set for a domain is cleared only with it
        handler.clear_cookie(name, path=self.prefix, **({"domain": domain} if domain else {}))

    def _clear_state_cookies(self, handler: web.RequestHandler) -> None:
        for name in list(handler.request.cookies):
            if name.startswith(self.state_cookie_name):
                self._clear(handler, name)

    def clear_cookie(self, handler: web.RequestHandler) -> None:
        self._clear(handler, self.cookie_name)

    def _state(self, handler: web.RequestHandler, state: str) -> dict[str, Any] | None:
        """This browser's record of the login ``state``: None if it has none, or a forged one."""
        raw = handler.get_signed_cookie(self._state_cookie(state), max_age_days=1)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(record, dict) or not hmac.compare_digest(str(record.get("s", "")), state):
            return None
        return record

    async def finish_login(self, handler: web.RequestHandler) -> None:
        """The OAuth callback: check the state, trade the code, set the login cookie, go back."""
        from ..hub import HubError

        state = handler.get_argument("state", None)
        if not state:
            raise web.HTTPError(400, "the login came back without its state; log in again")
        record = self._state(handler, state)
        if record is None:
            if await self.user(handler) is not None:
                # an old callback (the back button) of someone already logged in: no new token
                self._clear_state_cookies(handler)
                handler.redirect(self.prefix)
                return
            log.warning("login callback without its state cookie (expired, or not this browser's)")
            raise web.HTTPError(403, "this login was not started in this browser, or took too long; log in again")
        self._clear_state_cookies(handler)
        error = handler.get_argument("error", None)
        if error:  # the hub's answer to a login this browser started: said plainly, logged as given
            log.warning("the hub refused a login: %r %r", error[:100],
                        (handler.get_argument("error_description", "") or "")[:300])
            code_word = error if error in OAUTH_ERRORS else "error"
            raise web.HTTPError(400, "the hub did not log you in (%s); log in again", code_word)
        code = handler.get_argument("code", None)
        if not code:
            raise web.HTTPError(400, "the login came back without a code; log in again")
        if not isinstance(record.get("e"), (int, float)) or record["e"] <= self.clock():
            raise web.HTTPError(403, "this login took too long; log in again")
        try:
            token = await self._ask_hub(self.hub.oauth_token, client_id=self.client_id, code=code,
                                        redirect_uri=self.redirect_uri, code_verifier=str(record.get("v", "")))
        except HubError as e:
            log.warning("login: %s", e)
            raise web.HTTPError(502, "the hub did not complete the login; log in again") from None
        model = await self._identify(token, self.session_id(handler))
        if model is None:
            raise web.HTTPError(500, "the hub gave a login token it does not know")
        model.setdefault("kind", "user")
        if not self.allowed(model):
            raise web.HTTPError(403, "your hub account has no access to this page")
        handler.set_signed_cookie(self.cookie_name, token, **{**self._cookie_kwargs(handler), **self.cookie_options})
        log.info("logged in: %s %s", model["kind"], model.get("name"))
        next_url = str(record.get("n") or "")
        handler.redirect(next_url if next_url.startswith(self.prefix) and not next_url.startswith("//") else self.prefix)


def _trim(table: dict[str, Any], now: float, limit: int) -> None:
    """Keep a table of (expiry-first) entries under ``limit``: expired ones go first, then the oldest."""
    if len(table) <= limit:
        return
    for key in [k for k, v in table.items() if _expires(v) <= now]:
        del table[key]
    if len(table) > limit:  # all still live: the oldest half goes (its users log in again)
        for key in list(islice(table, len(table) - limit // 2)):
            del table[key]


def _expires(value: Any) -> float:
    return float(value[0])
