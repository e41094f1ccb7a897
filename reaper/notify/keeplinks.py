"""The one-click "keep running" link of a notice: signed, for one server run, until its stop.

A link is ``<page prefix>keep-link?t=<token>`` at the hub's public address. The token is
``<payload>.<signature>``: the payload is compact JSON (base64url) of who and what it is for —
user, server name, the run's start, the notice's id, and when it expires (the scheduled stop) —
and the signature is HMAC-SHA256 over the payload with the site's link secret (stdlib ``hmac``;
compared with ``hmac.compare_digest``). Changing any byte of the payload or the signature makes
the link invalid; a link past its expiry is expired; the store records a used link (by its id, the
SHA-256 of the token) so that it works once.

The secret: ``web.link_secret`` in config.yaml (``${VAR}``: secrets never live in the file), else
one generated once and kept in the reaper's database (reaper.store.keeplinks), so the reaper
that sends the mail and the page that takes the click agree across restarts.

Opening the link (GET) only shows a confirm page; the page's one button POSTs the token back.
See reaper/web/keeplink.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ..core.keep import KeepPolicy

DEFAULT_KEEP = timedelta(hours=2)  # what one click asks for, within the keep policy
NO_STOP_VALIDITY = timedelta(hours=24)  # a notice without a scheduled stop: its link lasts this long
VERSION = 1


class LinkError(Exception):
    """A keep link that cannot be used; ``status`` is the HTTP answer (403 invalid, 410 expired/used)."""

    status = 403
    code = "invalid"


class LinkInvalid(LinkError):
    status = 403
    code = "invalid"


class LinkExpired(LinkError):
    status = 410
    code = "expired"


class LinkUsed(LinkError):
    status = 410
    code = "used"


@dataclass(frozen=True)
class KeepLink:
    """What a keep link is good for: one server run, one notice, until ``expires``."""

    user: str
    server: str
    started: datetime
    notice: int
    expires: datetime

    @property
    def label(self) -> str:
        return f"{self.user}/{self.server}" if self.server else self.user

    def payload(self) -> dict[str, Any]:
        return {"v": VERSION, "u": self.user, "s": self.server, "r": _ts(self.started), "n": self.notice,
                "e": _ts(self.expires)}


def _ts(t: datetime) -> str:
    """An aware datetime as ISO 8601 UTC (exact to the microsecond, unlike a float timestamp)."""
    return t.astimezone(UTC).isoformat()


def _read_ts(value: Any) -> datetime:
    t = datetime.fromisoformat(str(value))
    if t.tzinfo is None:
        raise ValueError("naive time in a keep link")
    return t.astimezone(UTC)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, body: str) -> str:
    return _b64(hmac.new(secret, b"reaper-keep-link." + body.encode("ascii"), hashlib.sha256).digest())


def sign(secret: bytes, link: KeepLink) -> str:
    """The token of ``link``: ``<base64url JSON>.<base64url HMAC-SHA256>``."""
    body = _b64(json.dumps(link.payload(), separators=(",", ":"), sort_keys=True).encode())
    return f"{body}.{_mac(secret, body)}"


def link_id(token: str) -> str:
    """The id the store records a used link by (SHA-256 of the token: the token itself is not kept)."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def verify(secret: bytes, token: str, now: datetime) -> KeepLink:
    """The link a token stands for. Raises LinkInvalid (tampered, malformed, another secret) or
    LinkExpired (past its expiry). The signature is checked before anything in it is read."""
    if not isinstance(token, str) or token.count(".") != 1 or len(token) > 4096:
        raise LinkInvalid("this link is not one of ours (malformed)")
    body, mac = token.split(".")
    if not hmac.compare_digest(_mac(secret, body).encode(), mac.encode("ascii", "replace")):
        raise LinkInvalid("this link's signature does not match: it was changed, or is not one of ours")
    try:
        data = json.loads(_unb64(body))
        if data.get("v") != VERSION:
            raise ValueError("version")
        link = KeepLink(
            user=str(data["u"]), server=str(data["s"]),
            started=_read_ts(data["r"]), notice=int(data["n"]), expires=_read_ts(data["e"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LinkInvalid("this link could not be read") from e
    if now >= link.expires:
        raise LinkExpired("this link has expired: it was good until the server's scheduled stop")
    return link


def expiry(stop_at: datetime | None, job_end: datetime | None, now: datetime) -> datetime:
    """When a notice's link stops working: the scheduled stop; without one the walltime end, else
    :data:`NO_STOP_VALIDITY` from now (the run and the use-once record still bound it)."""
    for t in (stop_at, job_end):
        if t is not None and t > now:
            return t
    return now + NO_STOP_VALIDITY


def one_click(policy: KeepPolicy) -> timedelta:
    """How long one click keeps a server: 2 h, within the page's keep limits (``web.keep``): one of
    its offered durations — 2 h if offered, else the longest offered below it, else the shortest."""
    offered = policy.offered()
    if not offered:
        return min(DEFAULT_KEEP, policy.max_extension)
    if DEFAULT_KEEP in offered:
        return DEFAULT_KEEP
    below = [d for d in offered if d < DEFAULT_KEEP]
    return max(below) if below else min(offered)


def resolve_secret(configured: str | None, store: Any) -> bytes | None:
    """The link secret: ``web.link_secret`` when set, else the one kept in the store (made on first
    use); None when neither is available (no store: links fall back to the page)."""
    if configured:
        return configured.encode("utf-8")
    if store is not None and hasattr(store, "keeplinks"):
        return bytes(store.keeplinks.secret())
    return None
