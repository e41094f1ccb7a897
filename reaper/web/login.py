"""The page's login: the hub's OAuth flow, as JupyterHub's own ``HubOAuth`` does it.

Why not ``jupyterhub.services.auth``: it imports ``jupyterhub.scopes``, which imports JupyterHub's
ORM, and with it SQLAlchemy's ORM, alembic, mako and pygments: 18 MB a long-running service would
hold for a login (README, "Speed at scale"). The flow is short and the same here:

1. A visitor without a login is sent to the hub's ``/hub/api/oauth2/authorize`` with our client id,
   our callback, a fresh ``state`` and a PKCE challenge (S256). The state is also set in a signed,
   HttpOnly cookie that lives 10 minutes; the verifier and the page to come back to stay here.
2. The hub logs the user in and sends the browser to ``oauth_callback?code=...&state=...``. The
   state must be the one in the cookie and one we issued (each is used once), then the code is
   traded for the user's token (``POST /hub/api/oauth2/token``, our API token as client secret,
   the PKCE verifier), the hub is asked who holds the token (``GET /hub/api/user``), and the token
   is kept in a signed, HttpOnly cookie named after our client id, on our prefix only.
3. Each later request is identified by that cookie (or by ``Authorization: token ...``, for API
   clients), asking the hub who holds the token, with answers kept 60 s. A token the hub no longer
   knows (the user logged out of the hub) clears the cookie.
4. Access needs one of the hub's access scopes for this service (``$JUPYTERHUB_OAUTH_ACCESS_SCOPES``,
   else ``access:services!service=<name>``), as HubOAuth checks it.
5. Forms carry an xsrf token derived from the login token and the hub session (HMAC with the
   page's cookie secret): another user's page, or a user server on the same domain that sets
   cookies, cannot forge it. Requests with a token in the Authorization header need none.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from itertools import islice
from typing import Any
from urllib.parse import urlencode, urlparse

from tornado import web

log = logging.getLogger("reaper.web")

TOKEN_HEADER = re.compile(r"(?:token|bearer)\s+(\S+)\s*$", re.IGNORECASE)
SESSION_COOKIE = "jupyterhub-session-id"  # the hub's, on path /
MAX_CACHED = 10_000  # identities kept at once (each for cache_seconds)
MAX_PENDING = 1_000  # logins under way at once (each for state_seconds)


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
    """What the browser sees: the outermost X-Forwarded-Proto or X-Scheme, else the connection's."""
    for header in ("X-Forwarded-Proto", "X-Scheme"):
        value = request.headers.get(header, "").split(",", 1)[0].strip().lower()
        if value in ("http", "https"):
            return value
    return str(request.protocol)


@dataclass(frozen=True)
class _Pending:
    expires: float
    next_url: str
    verifier: str


class HubLogin:
    """Identify the page's visitors through the hub (see the module's docstring).

    ``hub`` answers ``identify(token)`` and ``oauth_token(client_id=, code=, redirect_uri=,
    code_verifier=)`` (reaper.hub.HubClient does, over HTTP; the tests' FakeHub from a table).
    """

    def __init__(
        self,
        hub: Any,
        *,
        prefix: str,
        client_id: str,
        authorize_url: str,
        redirect_uri: str,
        access_scopes: Iterable[str] = (),
        cookie_options: Mapping[str, Any] | None = None,
        secure: bool = False,
        cache_seconds: float = 60.0,
        state_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not client_id:
            raise ValueError("the hub's OAuth client id is empty (JUPYTERHUB_CLIENT_ID)")
        self.hub = hub
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.client_id = client_id
        self.authorize_url = authorize_url
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
        self._pending: dict[str, _Pending] = {}

    @classmethod
    def from_environment(cls, hub: Any, prefix: str, env: Mapping[str, str] | None = None) -> HubLogin:
        """Configured as the hub configures a managed service (JUPYTERHUB_CLIENT_ID, ..._HOST,
        ..._BASE_URL, ..._OAUTH_CALLBACK_URL, ..._OAUTH_ACCESS_SCOPES, ..._SERVICE_NAME,
        ..._COOKIE_OPTIONS, ..._PUBLIC_URL)."""
        env = os.environ if env is None else env
        name = env.get("JUPYTERHUB_SERVICE_NAME", "")
        base = "/" + env.get("JUPYTERHUB_BASE_URL", "/").strip("/")
        hub_prefix = base.rstrip("/") + "/hub/"
        raw_scopes = env.get("JUPYTERHUB_OAUTH_ACCESS_SCOPES") or env.get("JUPYTERHUB_OAUTH_SCOPES")
        scopes = set(json.loads(raw_scopes)) if raw_scopes else ({f"access:services!service={name}"} if name else set())
        public = env.get("JUPYTERHUB_PUBLIC_URL", "")
        return cls(
            hub,
            prefix=prefix,
            client_id=env.get("JUPYTERHUB_CLIENT_ID") or f"service-{name or 'reaper'}",
            authorize_url=env.get("JUPYTERHUB_HOST", "") + hub_prefix + "api/oauth2/authorize",
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
        key = hashlib.sha256(f"{session_id}:{token}".encode("utf-8", "replace")).hexdigest()
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return dict(hit[1]) if hit[1] is not None else None
        model = await self.hub.identify(token)
        self._cache[key] = (now + self.cache_seconds, model)
        _trim(self._cache, now, MAX_CACHED)
        return dict(model) if model is not None else None

    def allowed(self, model: Mapping[str, Any]) -> bool:
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
            model = await self._identify(token, session)
            if model is None:
                log.info("a login cookie's token is no longer known to the hub: cleared")
                self.clear_cookie(handler)
        if model is None:
            return None
        model.setdefault("kind", "user")
        if not self.allowed(model):
            log.warning("not allowed: %s %s lacks the scope %s", model["kind"], model.get("name"),
                        " or ".join(sorted(self.access_scopes)))
            raise web.HTTPError(403, "your hub account has no access to this service")
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
        given = (handler.get_argument("_xsrf", None) or handler.request.headers.get("X-Xsrftoken")
                 or handler.request.headers.get("X-Csrftoken"))
        if not given:
            raise web.HTTPError(403, "'_xsrf' argument missing from POST")
        if not self.cookie_token(handler) or not hmac.compare_digest(given.encode(), self.xsrf_token(handler)):
            raise web.HTTPError(403, "XSRF token does not match this login")

    # ---- the OAuth dance

    def _cookie_kwargs(self, handler: web.RequestHandler) -> dict[str, Any]:
        kw: dict[str, Any] = {"path": self.prefix, "httponly": True}
        if self.secure or browser_protocol(handler.request) == "https":
            kw["secure"] = True
        return kw

    def login_url(self, handler: web.RequestHandler) -> str:
        """The hub's authorize URL for this visitor; sets the state cookie."""
        now = self.clock()
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(16)
        uri = handler.request.uri or self.prefix
        next_url = uri if uri.startswith(self.prefix) and not uri.startswith("//") else self.prefix
        self._pending[state] = _Pending(now + self.state_seconds, next_url, verifier)
        _trim(self._pending, now, MAX_PENDING)
        # the admin's cookie options apply (e.g. samesite, domain), but never to its lifetime or path
        extra = {k: v for k, v in self.cookie_options.items()
                 if k.lower() not in ("path", "httponly", "max_age", "expires", "expires_days")}
        handler.set_signed_cookie(self._state_cookie(state), state, expires_days=None,
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

    def _clear_state_cookies(self, handler: web.RequestHandler) -> None:
        for name in list(handler.request.cookies):
            if name.startswith(self.state_cookie_name):
                handler.clear_cookie(name, path=self.prefix)

    def clear_cookie(self, handler: web.RequestHandler) -> None:
        handler.clear_cookie(self.cookie_name, path=self.prefix)

    async def finish_login(self, handler: web.RequestHandler) -> None:
        """The OAuth callback: check the state, trade the code, set the login cookie, go back."""
        from ..hub import HubError

        error = handler.get_argument("error", None)
        if error:
            raise web.HTTPError(400, "the hub refused the login: %s", handler.get_argument("error_description", error))
        code = handler.get_argument("code", None)
        state = handler.get_argument("state", None)
        if not code:
            raise web.HTTPError(400, "the login came back without a code; log in again")
        if not state:
            raise web.HTTPError(400, "the login came back without its state; log in again")
        cookie = handler.get_signed_cookie(self._state_cookie(state), max_age_days=1)
        if cookie is None:
            if await self.user(handler) is not None:
                # an old callback (the back button) of someone already logged in: no new token
                pending = self._pending.get(state)
                self._clear_state_cookies(handler)
                handler.redirect(pending.next_url if pending else self.prefix)
                return
            log.warning("login callback without its state cookie (expired, or not this browser's)")
            raise web.HTTPError(403, "this login was not started in this browser, or took too long; log in again")
        if not hmac.compare_digest(cookie, state.encode()):
            raise web.HTTPError(403, "the login's state does not match; log in again")
        pending = self._pending.pop(state, None)
        self._clear_state_cookies(handler)
        if pending is None or pending.expires <= self.clock():
            raise web.HTTPError(403, "this login took too long, or the service restarted; log in again")
        try:
            token = await self.hub.oauth_token(client_id=self.client_id, code=code, redirect_uri=self.redirect_uri,
                                               code_verifier=pending.verifier)
        except HubError as e:
            log.warning("login: %s", e)
            raise web.HTTPError(502, "the hub did not complete the login; log in again") from None
        model = await self._identify(token, self.session_id(handler))
        if model is None:
            raise web.HTTPError(500, "the hub gave a login token it does not know")
        model.setdefault("kind", "user")
        if not self.allowed(model):
            raise web.HTTPError(403, "your hub account has no access to this service")
        handler.set_signed_cookie(self.cookie_name, token, **{**self._cookie_kwargs(handler), **self.cookie_options})
        log.info("logged in: %s %s", model["kind"], model.get("name"))
        handler.redirect(pending.next_url)


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
    return float(value.expires if isinstance(value, _Pending) else value[0])
