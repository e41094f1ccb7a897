"""The page's login: JupyterHub's own ``HubOAuth`` (``jupyterhub.services.auth``), configured for
this page, as every JupyterHub service logs its visitors in.

The flow is the hub's: a visitor without a login is sent to the hub's
``/hub/api/oauth2/authorize`` (our client id, our callback, a ``state`` kept in a signed cookie
for 10 minutes, a PKCE challenge); the hub logs the user in and sends the browser back to
``<prefix>oauth_callback`` (:class:`jupyterhub.services.auth.HubOAuthCallbackHandler`), which
trades the code for the user's token (our API token is the client secret) and keeps the token in
a signed, HttpOnly cookie named after our client id, on our prefix. Later requests are identified
by that cookie or by ``Authorization: token ...`` (API clients), asking the hub who holds the
token (``GET /hub/api/user``), answers kept ``cache_max_age`` seconds. Forms and scripted reads
carry JupyterHub's xsrf token, bound to the login token and the hub session.

These calls go over JupyterHub's own HTTP client, never the sweep's hub client (reaper.hub): a
slow login cannot take the sweep's connections, nor the other way round.

What is ours (the thin part): the configuration from the hub's environment, the scope the page
requires when the hub names none (never "every hub user"), and that only users, not services,
use the page (services use the hub's API).

Importing this module costs about 18 MB of resident memory (``jupyterhub.scopes`` imports the
hub's ORM, SQLAlchemy's ORM, alembic...); it is imported only when the page is served.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated, UserNotAllowed

__all__ = ["HubOAuth", "HubOAuthCallbackHandler", "HubOAuthenticated", "UserNotAllowed", "hub_home", "hub_oauth"]

CACHE_SECONDS = 60  # how long the hub's answer "who holds this token" is reused (JupyterHub's default: 300)


def _hub_prefix(env: Mapping[str, str]) -> str:
    base = "/" + env.get("JUPYTERHUB_BASE_URL", "/").strip("/")
    return base.rstrip("/") + "/hub/"


def hub_home(env: Mapping[str, str] | None = None) -> str:
    """The hub's home page (the page's top bar links to it)."""
    env = os.environ if env is None else env
    return env.get("JUPYTERHUB_HOST", "") + _hub_prefix(env) + "home"


def access_scopes(env: Mapping[str, str]) -> set[str]:
    """The scopes a visitor needs: the hub's ``$JUPYTERHUB_OAUTH_ACCESS_SCOPES``, else
    ``access:services!service=<name>``. Never empty: with no scope to require, HubOAuthenticated
    would let every hub user and service in."""
    name = env.get("JUPYTERHUB_SERVICE_NAME", "") or "reaper"
    raw = env.get("JUPYTERHUB_OAUTH_ACCESS_SCOPES") or env.get("JUPYTERHUB_OAUTH_SCOPES")
    scopes = set(json.loads(raw) or ()) if raw else set()
    return scopes or {f"access:services!service={name}"}


def hub_oauth(*, api_url: str, api_token: str | None, prefix: str, env: Mapping[str, str] | None = None,
              **overrides: Any) -> HubOAuth:
    """A :class:`HubOAuth` for the page under ``prefix``, configured as the hub configures a managed
    service (JUPYTERHUB_CLIENT_ID, ..._HOST, ..._BASE_URL, ..._OAUTH_CALLBACK_URL,
    ..._OAUTH_ACCESS_SCOPES, ..._SERVICE_NAME, ..._COOKIE_OPTIONS, ..._COOKIE_HOST_PREFIX_ENABLED),
    asking the hub at ``api_url`` (the reaper's ``hub.api_url``) with the service's token."""
    env = os.environ if env is None else env
    if not api_token:
        raise ValueError("the page's login needs the service's hub API token (JUPYTERHUB_API_TOKEN)")
    if not prefix.endswith("/"):
        prefix += "/"
    name = env.get("JUPYTERHUB_SERVICE_NAME", "") or "reaper"
    options: dict[str, Any] = {
        "api_url": api_url.rstrip("/"),
        "api_token": api_token,
        "base_url": prefix,
        "hub_host": env.get("JUPYTERHUB_HOST", ""),
        "hub_prefix": _hub_prefix(env),
        "oauth_client_id": env.get("JUPYTERHUB_CLIENT_ID") or f"service-{name}",
        "oauth_redirect_uri": env.get("JUPYTERHUB_OAUTH_CALLBACK_URL") or prefix + "oauth_callback",
        "access_scopes": access_scopes(env),
        "cookie_options": json.loads(env["JUPYTERHUB_COOKIE_OPTIONS"]) if env.get("JUPYTERHUB_COOKIE_OPTIONS") else {},
        "cookie_host_prefix_enabled": env.get("JUPYTERHUB_COOKIE_HOST_PREFIX_ENABLED", "").lower()
        in ("1", "true", "yes"),
        "cache_max_age": CACHE_SECONDS,
    }
    options.update(overrides)
    return HubOAuth(**options)
