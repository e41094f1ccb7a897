"""The outbox's channels: a stored notice -> rendered message -> e-mail or Slack direct message.

A delivery carries the :class:`~reaper.store.NoticeContext` recorded with the notice; it is
rendered with the configured templates at delivery time (times relative to the moment it is sent).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urljoin

import yaml

from ..config import Settings
from ..core.model import NoticeKind
from ..store.context import NoticeContext
from ..store.slack import SlackLookups
from ..units import format_duration
from .keeplinks import KeepLink, expiry, one_click, resolve_secret, sign
from .outbox import DeliveryError, LogChannel
from .render import RenderedNotice, TemplateContext, context_from, render

log = logging.getLogger("reaper.notify")


def keep_url(settings: Settings, user: str, server: str, *, env: Mapping[str, str] = os.environ) -> str:
    """The "Keep running" link of a notice: this server's card on the reaper's page (its id in
    reaper/web/templates/_server.html), at the hub's public address under the page's own prefix
    (``web.prefix``, else the hub's ``JUPYTERHUB_SERVICE_PREFIX``). The prefix is a full path that
    already holds the hub's base_url, so it replaces any path of ``hub.public_url``."""
    prefix = settings.web.page_prefix(env)
    card = quote(f"server-{user}-{server or 'default'}", safe="-_.~@")
    return urljoin(settings.hub.effective_public_url() + "/", prefix) + "#" + card


def signed_keep_url(settings: Settings, token: str, *, env: Mapping[str, str] = os.environ) -> str:
    """The one-click keep link: the confirm page (reaper/web/keeplink.py) with the signed token."""
    prefix = settings.web.page_prefix(env)
    return urljoin(settings.hub.effective_public_url() + "/", prefix) + "keep-link?" + urlencode({"t": token})


# the notices that offer to keep the server running (a stopped server, a cancelled job and a time
# limit cannot be kept)
KEEPABLE = frozenset({NoticeKind.WARNING, NoticeKind.REMINDER, NoticeKind.FINAL})


def notice_keep_url(kind: NoticeKind, notice: NoticeContext, settings: Settings, now: datetime, *,
                    secret: bytes | None, notice_id: int | None, started: datetime | None,
                    env: Mapping[str, str] = os.environ) -> str | None:
    """The keep link of a notice: signed for this run and notice until its scheduled stop when the
    link secret and the run are known, else the server's card on the page (the old link)."""
    if kind not in KEEPABLE:
        return None
    started = started or notice.started
    if secret is None or notice_id is None or started is None:
        return keep_url(settings, notice.user, notice.server, env=env)
    link = KeepLink(user=notice.user, server=notice.server, started=started, notice=int(notice_id),
                    expires=expiry(notice.stop_at, notice.job_end, notice.created_at or now))
    return signed_keep_url(settings, sign(secret, link), env=env)


def template_context(kind: NoticeKind | str, notice: NoticeContext, settings: Settings, now: datetime,
                     *, number: int = 1, secret: bytes | None = None, notice_id: int | None = None,
                     started: datetime | None = None) -> TemplateContext:
    """The template context of a stored notice, with the site's settings at delivery time."""
    k = NoticeKind(kind)
    return context_from(
        notice,
        public_url=settings.hub.effective_public_url(),
        tz=settings.hub.timezone,
        now=now,
        hub_name=settings.hub.name,
        keep_url=notice_keep_url(k, notice, settings, now, secret=secret, notice_id=notice_id, started=started),
        keep_for=format_duration(one_click(settings.web.keep.policy())),
        page_url=keep_url(settings, notice.user, notice.server),
        admin_contact=settings.notify.admin_contact,
        notice_number=number,
    )


def notice_number(kind: NoticeKind, seq: int) -> int:
    """Which notice of its spell this is, as the user counts them: the warning is notice 1, the
    n-th reminder (``seq`` n) notice n + 1."""
    return seq + 1 if kind is NoticeKind.REMINDER and seq > 0 else 1


def render_delivery(delivery: Any, settings: Settings, now: datetime, *,
                    secret: bytes | None = None) -> RenderedNotice:
    """A delivery rendered; with the link ``secret`` its keep link is the signed one-click link
    (the same on every channel of the notice: one use in all)."""
    kind = NoticeKind(delivery.kind)
    number = notice_number(kind, int(getattr(delivery, "seq", 0) or 0))
    run = getattr(delivery, "run", None)
    ctx = template_context(kind, delivery.context, settings, now, number=number, secret=secret,
                           notice_id=getattr(delivery, "notice_id", None),
                           started=getattr(run, "started", None))
    return render(kind, ctx, template_dir=settings.notify.templates)


def _secret(settings: Settings, store: Any) -> bytes | None:
    try:
        return resolve_secret(settings.web.link_secret, store)
    except Exception:  # a database that cannot give the secret: the notice goes out with the page's link
        log.exception("keep links: no signing secret (web.link_secret unset, the store failed); "
                      "notices link to the page instead")
        return None


def _load_map(path: str | None, what: str) -> dict[str, str]:
    if not path:
        return {}
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a mapping of username: value")
    return {str(k): str(v) for k, v in data.items()}


class EmailChannel:
    name = "email"

    def __init__(self, settings: Settings, *, clock: Any = None, store: Any = None) -> None:
        from .email import EmailSender

        cfg = settings.notify.email
        assert cfg is not None
        self.settings = settings
        self.cfg = cfg
        self.sender = EmailSender(
            cfg.host,
            cfg.port,
            security=cfg.security,
            username=cfg.username,
            password=cfg.password,
            from_addr=cfg.from_addr,
            reply_to=cfg.reply_to,
            list_id=cfg.list_id,
            timeout=cfg.timeout.total_seconds(),
            validate_certs=cfg.validate_certs,
            cert_bundle=cfg.cert_bundle,
        )
        self.address_map = _load_map(cfg.address_map, "notify.email.address_map")
        self.clock = clock or (lambda: datetime.now(UTC))
        self.store = store

    def address(self, username: str) -> str | None:
        from .email import resolve_address

        return resolve_address(username, template=self.cfg.address_template, mapping=self.address_map)

    async def send(self, username: str, rendered: RenderedNotice, *, kind: NoticeKind) -> str:
        to = self.address(username)
        if not to:
            raise DeliveryError(f"no valid e-mail address for user {username!r}", permanent=True)
        cc = self.settings.notify.admin_cc if kind in (NoticeKind.STOPPED, NoticeKind.ORPHAN) else None
        return await self.sender.send(to, rendered, cc=cc or None)

    async def deliver(self, delivery: Any) -> None:
        rendered = render_delivery(delivery, self.settings, self.clock(), secret=_secret(self.settings, self.store))
        await self.send(delivery.run.user, rendered, kind=NoticeKind(delivery.kind))


class StoreLookupCache:
    """Slack e-mail -> member id answers kept in the reaper's database, with their expiry, so that
    a restart does not look every user up again (the slack.LookupCache protocol)."""

    def __init__(self, lookups: SlackLookups, clock: Any = None) -> None:
        self.lookups = lookups
        self.clock = clock or (lambda: datetime.now(UTC))

    def get(self, email: str) -> Any:
        from .slack import CachedLookup

        found, user_id = self.lookups.lookup(email, self.clock())
        return CachedLookup(user_id) if found else None

    def set(self, email: str, user_id: str | None, ttl: Any) -> None:
        self.lookups.remember(email, user_id, self.clock() + ttl)


class SlackChannel:
    name = "slack"

    def __init__(self, settings: Settings, *, email: EmailChannel | None, store: Any = None,
                 clock: Any = None) -> None:
        from .slack import SlackSender

        cfg = settings.notify.slack
        assert cfg is not None
        if not cfg.token:
            raise ValueError("notify.slack.token is not set (write \"${SLACK_BOT_TOKEN}\")")
        self.settings = settings
        self.cfg = cfg
        cache = StoreLookupCache(store.slack) if store is not None and hasattr(store, "slack") else None
        self.sender = SlackSender(cfg.token, base_url=cfg.base_url, found_ttl=cfg.lookup_ttl, cache=cache)
        self.user_map = _load_map(cfg.user_map, "notify.slack.user_map")
        self.email = email
        self.store = store
        self.clock = clock or (lambda: datetime.now(UTC))

    async def member_id(self, username: str) -> str | None:
        if username in self.user_map:
            return self.user_map[username]
        addr = self.email.address(username) if self.email else None
        if not addr:
            return None
        return await self.sender.lookup_user(addr)

    async def deliver(self, delivery: Any) -> None:
        user = delivery.run.user
        rendered = render_delivery(delivery, self.settings, self.clock(), secret=_secret(self.settings, self.store))
        member = await self.member_id(user)
        if member is None:
            if self.cfg.fallback_to_email and self.email is not None:
                await self.email.send(user, rendered, kind=NoticeKind(delivery.kind))
                log.warning("slack: %s not found on Slack (users_not_found); notice %s sent by e-mail instead",
                            user, delivery.kind)
                if self.store is not None:
                    import asyncio

                    await asyncio.to_thread(
                        self.store.reports.record_action, delivery.run, "slack-fallback", True,
                        f"users_not_found on Slack: {delivery.kind} sent by e-mail", self.clock(),
                    )
                return
            raise DeliveryError(f"{user} not found on Slack (users_not_found) and no e-mail fallback",
                                permanent=True)
        await self.sender.send(member, rendered)


def build_channels(settings: Settings, *, store: Any = None, hub: Any = None) -> dict[str, Any]:
    from .lab import LabChannel  # the open JupyterLab, through the companion (reaches servers by ``hub``)

    channels: dict[str, Any] = {"log": LogChannel(), "lab": LabChannel(settings, hub=hub, store=store)}
    email = EmailChannel(settings, store=store) if settings.notify.email is not None else None
    if email is not None:
        channels["email"] = email
    if settings.notify.slack is not None:
        channels["slack"] = SlackChannel(settings, email=email, store=store)
    return channels
