"""The reaper's web page as a JupyterHub managed service (tornado; the hub's OAuth login, reaper.web.login).

The hub tells a managed service with a ``url`` where to listen (``JUPYTERHUB_SERVICE_URL``) and
under which prefix it is proxied (``JUPYTERHUB_SERVICE_PREFIX``, e.g. ``/services/reaper/``), and
gives it its OAuth client (``JUPYTERHUB_CLIENT_ID``, ``JUPYTERHUB_OAUTH_CALLBACK_URL``). Without
``JUPYTERHUB_SERVICE_URL`` no page is served, unless ``web.listen`` in config.yaml asks for one.

config.yaml keys (section ``web``)::

    web:
      admin_group: reaper-admins   # members see every server (hub admins always do)
      keep:
        max_extension: 8h          # the longest "Keep running" a user may choose at once
        max_per_day: 3             # "Keep running" presses per server in 24 h
        choices: [1h, 2h, 4h, 8h]  # the durations offered on the page (each <= max_extension)
      dry_run_cache: 60s           # how long the admin's "next sweep would do" view is reused
      listen: http://127.0.0.1:8123   # force a page without the hub's JUPYTERHUB_SERVICE_URL
      prefix: /services/reaper/    # default: $JUPYTERHUB_SERVICE_PREFIX
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tornado.httpserver import HTTPServer
from tornado.web import Application

from ..config import Duration, format_duration
from ..metrics import METRICS, Metrics

log = logging.getLogger("reaper.web")

HERE = Path(__file__).resolve().parent


class KeepPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_extension: Duration = timedelta(hours=8)
    max_per_day: int = Field(default=3, ge=0, le=100)
    # The durations offered on the page; default: 1h, 2h, 4h, 8h up to max_extension, and max_extension.
    choices: list[Duration] | None = None

    @model_validator(mode="after")
    def _choices_fit(self) -> KeepPolicy:
        for c in self.choices or ():
            if c <= timedelta(0):
                raise ValueError("keep.choices: every choice must be longer than 0")
            if c > self.max_extension:
                raise ValueError(
                    f"keep.choices: {format_duration(c)} is longer than keep.max_extension "
                    f"({format_duration(self.max_extension)})"
                )
        return self

    def offered(self) -> list[timedelta]:
        if self.choices:
            return sorted(set(self.choices))
        hours = [timedelta(hours=h) for h in (1, 2, 4, 8) if timedelta(hours=h) < self.max_extension]
        return [*hours, self.max_extension] if self.max_extension > timedelta(0) else []


class WebSettings(BaseModel):
    """The ``web`` section of config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    admin_group: str | None = None
    keep: KeepPolicy = KeepPolicy()
    dry_run_cache: Duration = timedelta(seconds=60)
    listen: str | None = None
    prefix: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is None:
            return v
        u = urlparse(v)
        if u.scheme not in ("http", "https") or not u.port:
            raise ValueError(f"web.listen must look like http://127.0.0.1:8123, not {v!r}")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is None:
            return v
        return "/" + v.strip("/") + "/" if v.strip("/") else "/"


def page_prefix(ws: WebSettings, env: Mapping[str, str] = os.environ) -> str:
    """The path the page is served under, ending in "/": ``web.prefix``, else the hub's
    ``JUPYTERHUB_SERVICE_PREFIX`` (it includes the hub's base_url), else ``/services/reaper/``."""
    prefix = ws.prefix or env.get("JUPYTERHUB_SERVICE_PREFIX") or "/services/reaper/"
    return prefix if prefix.endswith("/") else prefix + "/"


def web_settings(raw: dict[str, Any] | None) -> WebSettings:
    """Validate ``settings.web``; raises ValueError with the key path on a bad value."""
    try:
        return WebSettings.model_validate(raw or {})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in ("web", *err["loc"]))
            problems.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
        raise ValueError("; ".join(problems)) from None


@dataclass
class WebContext:
    """What every handler needs: the running service and the page's own settings."""

    service: Any  # reaper.service.ReaperService (or a test double with the same attributes)
    prefix: str
    login: Any  # reaper.web.login.HubLogin
    metrics: Metrics = METRICS
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    dry_run_at: datetime | None = None
    dry_run_result: Any = None
    dry_run_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    clock: Any = None  # () -> aware UTC datetime; default datetime.now(UTC)

    @property
    def settings(self) -> Any:
        return self.service.settings

    @property
    def web(self) -> WebSettings:
        return web_settings(self.service.settings.web)

    def now(self) -> datetime:
        return self.clock() if self.clock is not None else datetime.now(UTC)

    def url(self, path: str = "") -> str:
        return self.prefix + path.lstrip("/")


def page_secret(api_token: str | None) -> bytes:
    """The key that signs the page's cookies and xsrf tokens: derived from the service's API token
    (HMAC, one way), so a restart of the service keeps its visitors logged in and their open forms
    valid; a new token (or none: random) logs them in again through the hub, unnoticed."""
    if not api_token:
        return secrets.token_bytes(32)
    return hmac.new(api_token.encode(), b"jupyterhub-reaper page cookie secret", "sha256").digest()


def make_app(
    service: Any,
    *,
    prefix: str = "/services/reaper/",
    login: Any = None,
    metrics: Metrics | None = None,
    cookie_secret: bytes | None = None,
    clock: Any = None,
) -> Application:
    """The tornado application (routes under ``prefix``). ``login`` defaults to the hub's OAuth
    login, configured from the hub's environment, asking the service's hub client."""
    from . import handlers as h
    from .login import HubLogin

    web_settings(service.settings.web)  # fail early on a bad web section
    if not prefix.endswith("/"):
        prefix += "/"
    if login is None:
        login = HubLogin.from_environment(service.hub, prefix)
    ctx = WebContext(service=service, prefix=prefix, login=login, metrics=metrics or METRICS, clock=clock)
    args = {"ctx": ctx}
    p = prefix
    routes: list[Any] = [
        (p, h.PageHandler, args),
        (p + "keep", h.KeepHandler, args),
        (p + "stop", h.StopHandler, args),
        (p + "api/servers", h.ServersAPIHandler, args),
        (p + r"api/servers/([^/]+)/?([^/]*)", h.ServerAPIHandler, args),
        (p + "api/admin/summary", h.AdminSummaryAPIHandler, args),
        (p + "api/admin/next-sweep", h.NextSweepAPIHandler, args),
        (p + "metrics", h.MetricsHandler, args),
        (p + "health", h.HealthHandler, args),
        (p + "oauth_callback", h.CallbackHandler, args),
    ]
    if p != "/":
        routes.append((p.rstrip("/"), h.AddSlashHandler, args))
    return Application(
        routes,
        template_path=str(HERE / "templates"),
        static_path=str(HERE / "static"),
        static_url_prefix=p + "static/",
        cookie_secret=cookie_secret or page_secret(service.settings.hub.effective_token()),
        xsrf_cookies=True,  # tornado calls check_xsrf_cookie on every POST: BaseHandler binds it to the login
        login_url=p,  # replaced by the hub's OAuth URL in BaseHandler.get_login_url
        default_handler_class=h.NotFoundHandler,
        default_handler_args=args,
        compress_response=True,
        autoescape="xhtml_escape",
        reaper_ctx=ctx,
    )


class WebServer:
    """The running page: ``stop()`` closes the listening socket."""

    def __init__(self, server: HTTPServer | None, url: str | None, app: Application | None) -> None:
        self.server = server
        self.url = url
        self.app = app

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


async def start_web(service: Any) -> WebServer:
    """Start the page if the hub gave the service a URL (or ``web.listen`` forces one).

    Returns an object with ``stop()``; without a URL it serves nothing and ``stop()`` does nothing.
    """
    ws = web_settings(service.settings.web)
    url = ws.listen or os.environ.get("JUPYTERHUB_SERVICE_URL")
    if not url:
        log.info("no JUPYTERHUB_SERVICE_URL (and no web.listen): the web page is not served")
        return WebServer(None, None, None)
    u = urlparse(url)
    if u.scheme == "https":
        # the hub's internal_ssl: it would reach the page over TLS with client certificates, which
        # the page does not serve; plain HTTP on an https address would fail in a way no one reads
        log.error("the hub asks for the page over TLS (internal_ssl: %s); the page does not support it "
                  "and is not served. Sweeps go on. Run the hub without internal_ssl, or give the page a plain "
                  "http address (web.listen, and the service's url in jupyterhub_config.py).", url)
        return WebServer(None, None, None)
    host = u.hostname or "127.0.0.1"
    port = u.port or (443 if u.scheme == "https" else 80)
    prefix = page_prefix(ws)
    app = make_app(service, prefix=prefix)
    server = HTTPServer(app, xheaders=True)
    server.listen(port, address=host)
    log.info("web page listening on http://%s:%d%s", host, port, prefix)
    return WebServer(server, f"http://{host}:{port}{prefix}", app)
