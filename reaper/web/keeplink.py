"""The one-click keep link's confirm page: ``<prefix>keep-link?t=<token>`` (reaper/notify/keeplinks.py).

- **GET** shows what the link is for and one button, "Keep running for 2h". It never acts: mail
  scanners and link previews open links, and opening one must not keep a server.
- **POST** (the button; the token in the form body) keeps the server running exactly as the page's
  Keep button does (reaper.web.handlers.apply_keep: the keep policy, ``kept_until``, the recorded
  action), once: the store records the link as used before the keep, and forgets it again if the
  keep did not happen (refused by the policy, the server gone).

No hub login: the link's signature is the authority for this one action, on this one server run,
until its scheduled stop. A tampered link (403), an expired or already used one, or one whose
server run has ended (410) gets a page that says so, and nothing changes.

CSRF: tornado's xsrf cookie check is switched off for this handler on purpose, and that is safe.
CSRF abuses credentials the browser adds by itself (cookies); this POST reads none — its only
authority is the token in the body, which a forging site can only put there if it already holds
the link, and whoever holds the link can press the button anyway. The worst a forged or replayed
request can do is what the link allows once: keep that server run for one policy-limited spell.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

from tornado import web

from ..core.keep import KeepRefused
from ..notify.keeplinks import KeepLink, LinkError, LinkUsed, link_id, one_click, resolve_secret, verify
from ..units import format_duration, local_datetime, relative
from .context import WebContext
from .handlers import apply_keep

log = logging.getLogger("reaper.web")

TITLES = {
    "confirm": "Keep your server running?",
    "kept": "Your server keeps running",
    "invalid": "This link does not work",
    "expired": "This link has expired",
    "used": "This link was already used",
    "ended": "That server has stopped",
    "refused": "Cannot keep it running longer",
}


class KeepLinkHandler(web.RequestHandler):
    """GET: the confirm page; POST: the one keep. No login; the token is the authority."""

    ctx: WebContext

    def initialize(self, ctx: WebContext) -> None:
        self.ctx = ctx

    def set_default_headers(self) -> None:
        self.set_header(
            "Content-Security-Policy",
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'",
        )
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Referrer-Policy", "no-referrer")  # the token is in this page's address
        self.set_header("Cache-Control", "no-store")

    def check_xsrf_cookie(self) -> None:
        """The signed token in the form is this POST's only authority (see the module's docstring)."""
        return None

    # ---- helpers

    async def secret(self) -> bytes:
        """``web.link_secret``, else the store's (read in a worker thread: the first read is a query)."""
        secret = await asyncio.to_thread(resolve_secret, self.ctx.settings.web.link_secret, self.ctx.service.store)
        assert secret is not None  # the service always has a store
        return secret

    def show(self, result: str, status: int = 200, **kw: Any) -> None:
        s = self.ctx.settings
        base = s.hub.effective_public_url()
        policy = self.ctx.keep
        self.set_status(status)
        self.render(
            "keeplink.html", result=result, title=TITLES.get(result, TITLES["invalid"]), hub_name=s.hub.name,
            hub_home=f"{base}/hub/home", prefix=self.ctx.prefix, action=self.ctx.url("keep-link"),
            keep_for=format_duration(one_click(policy)), max_extension=format_duration(policy.max_extension),
            max_per_day=policy.max_per_day, **{"message": "", "token": "", "label": "", "stop_words": "",
                                               "until_words": "", "note": "", "server_url": base + "/hub/home",
                                               **kw},
        )

    def words(self, t: datetime) -> str:
        return f"{local_datetime(t, self.ctx.settings.tz)} ({relative(t, self.ctx.now())})"

    @staticmethod
    def label(link: KeepLink) -> str:
        return f'server "{link.server}"' if link.server else "server"

    def server_url(self, link: KeepLink) -> str:
        from ..hub.models import quote_segment

        path = f"/user/{quote_segment(link.user)}/" + (f"{quote_segment(link.server)}/" if link.server else "")
        return self.ctx.settings.hub.effective_public_url() + path

    async def check(self, token: str) -> KeepLink | None:
        """The link of a token, or None after showing why it cannot be used."""
        try:
            link = verify(await self.secret(), token, self.ctx.now())
            if await asyncio.to_thread(self.ctx.service.store.keeplinks.used_at, link_id(token)) is not None:
                raise LinkUsed("this link was already used: each notice's link keeps the server once. "
                               "A later notice brings a new one.")
        except LinkError as e:
            log.info("keep link refused (%s) from %s", e.code, self.request.remote_ip)
            self.show(e.code, e.status, message=str(e))
            return None
        return link

    # ---- GET: show, never act

    async def get(self) -> None:
        token = self.get_query_argument("t", "")
        link = await self.check(token)
        if link is None:
            return
        self.show("confirm", token=token, label=self.label(link), stop_words=self.words(link.expires),
                  server_url=self.server_url(link))

    # ---- POST: the one keep

    async def post(self) -> None:
        token = self.get_body_argument("t", "")
        link = await self.check(token)
        if link is None:
            return
        store = self.ctx.service.store
        lid = link_id(token)
        now = self.ctx.now()
        if not await asyncio.to_thread(store.keeplinks.claim, lid, user=link.user, server=link.server,
                                       notice_id=link.notice, now=now):
            return self.show("used", 410, message="this link was already used: each notice's link keeps "
                                                   "the server once.")
        actor = f"{link.user} (keep link)"[:255]
        try:
            kept = await apply_keep(self.ctx, link.user, link.server, one_click(self.ctx.keep), actor=actor,
                                    started=link.started)
        except KeepRefused as e:
            await asyncio.to_thread(store.keeplinks.release, lid)
            return self.show("refused", 409, message=str(e))
        except Exception:
            await asyncio.to_thread(store.keeplinks.release, lid)
            raise
        if kept is None:
            await asyncio.to_thread(store.keeplinks.release, lid)
            return self.show("ended", 410, message="that server run has ended (stopped, or started again): "
                                                    "there is nothing to keep running.")
        log.info("%s: kept by the keep link of notice %d", link.label, link.notice)
        self.show("kept", label=self.label(link), until_words=self.words(kept.until), note=kept.note,
                  server_url=self.server_url(link))
