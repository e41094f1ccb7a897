"""The reaper's web page as a JupyterHub managed service (tornado; JupyterHub's HubOAuth login, reaper.web.auth).

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

import hmac
import logging
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tornado.httpserver import HTTPServer
from tornado.web import Application

from ..config import WebSettings
from ..metrics import METRICS, Metrics
from .context import WebContext

log = logging.getLogger("reaper.web")

HERE = Path(__file__).resolve().parent


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
    hub_auth: Any = None,
    metrics: Metrics | None = None,
    cookie_secret: bytes | None = None,
    clock: Any = None,
) -> Application:
    """The tornado application (routes under ``prefix``). ``hub_auth`` defaults to JupyterHub's
    HubOAuth, configured from the hub's environment, asking the hub at ``hub.api_url`` over
    JupyterHub's own HTTP client (never the sweep's hub client)."""
    # JupyterHub's HubOAuth (about 18 MB with the hub's ORM it imports) loads only when a page is made
    from . import handlers as h
    from .auth import hub_home, hub_oauth
    from .keeplink import KeepLinkHandler

    if not prefix.endswith("/"):
        prefix += "/"
    if hub_auth is None:
        hub = service.settings.hub
        hub_auth = hub_oauth(api_url=hub.effective_api_url(), api_token=hub.effective_token(), prefix=prefix)
    ctx = WebContext(service=service, prefix=prefix, hub_auth=hub_auth, hub_home=hub_home(),
                     metrics=metrics or METRICS, clock=clock)
    args = {"ctx": ctx}
    p = prefix
    # (path under the prefix, handler): a new page is one more line here
    pages: list[tuple[str, type[Any]]] = [
        ("", h.PageHandler),
        ("keep", h.KeepHandler),
        ("keep-link", KeepLinkHandler),  # the notices' signed one-click link: no hub login
        ("stop", h.StopHandler),
        ("api/servers", h.ServersAPIHandler),
        (r"api/servers/([^/]+)/?([^/]*)", h.ServerAPIHandler),
        ("api/admin/summary", h.AdminSummaryAPIHandler),
        ("api/admin/next-sweep", h.NextSweepAPIHandler),
        ("metrics", h.MetricsHandler),
        ("health", h.HealthHandler),
        ("oauth_callback", h.CallbackHandler),  # JupyterHub's HubOAuthCallbackHandler
    ]
    routes: list[Any] = [(p + path, handler, args) for path, handler in pages]
    if p != "/":
        routes.append((p.rstrip("/"), h.AddSlashHandler, args))
    return Application(
        routes,
        template_path=str(HERE / "templates"),
        static_path=str(HERE / "static"),
        static_url_prefix=p + "static/",
        cookie_secret=cookie_secret or page_secret(service.settings.hub.effective_token()),
        xsrf_cookies=True,  # tornado calls check_xsrf_cookie on every POST: HubOAuth binds it to the login
        login_url=p,  # replaced by the hub's OAuth URL in HubOAuthenticated.get_login_url
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
    ws: WebSettings = service.settings.web
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
    port = u.port or 80  # (https was refused above)
    prefix = ws.page_prefix()
    app = make_app(service, prefix=prefix)
    server = HTTPServer(app, xheaders=True)
    server.listen(port, address=host)
    log.info("web page listening on http://%s:%d%s", host, port, prefix)
    return WebServer(server, f"http://{host}:{port}{prefix}", app)
