"""Slack direct messages (slack-sdk's AsyncWebClient): find the user by e-mail, DM them with Block Kit.

Rate limits: slack-sdk's ``AsyncRateLimitErrorRetryHandler`` sleeps for the ``Retry-After`` the API
sends with a 429 and tries again (``rate_limit_retries`` times); connection errors and 500/503
are retried once by the SDK's connection-error and server-error handlers. What is still failing
after that is a *temporary* DeliveryError for the outbox to retry later.

Permanent (DeliveryError.permanent=True): the token is wrong or dead (``invalid_auth``,
``not_authed``, ``account_inactive``, ``token_revoked`` ...), the DM cannot exist
(``channel_not_found``, ``user_not_found``, ``user_disabled``, ``cannot_dm_bot``), the message
itself is refused (``invalid_blocks``, ``msg_too_long``, ``invalid_arguments``). Anything else,
including errors this module does not know, is temporary: retrying is bounded by the outbox.

The token is never logged: ``repr(SlackSender)`` hides it and errors carry only Slack's error code.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import aiohttp
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from .outbox import DeliveryError
from .render import RenderedNotice

log = logging.getLogger("reaper.notify.slack")

PERMANENT_ERRORS = frozenset({
    "invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired",
    "no_permission", "missing_scope", "not_allowed_token_type", "ekm_access_denied", "team_access_not_granted",
    "channel_not_found", "user_not_found", "users_not_found", "user_disabled", "cannot_dm_bot",
    "is_archived", "not_in_channel", "restricted_action",
    "invalid_blocks", "invalid_blocks_format", "msg_too_long", "no_text", "too_many_attachments",
    "invalid_arguments", "invalid_arg_name", "invalid_array_arg", "invalid_charset", "invalid_form_data",
    "invalid_post_type", "missing_post_type", "method_deprecated", "deprecated_endpoint",
})

TEXT_LIMIT = 40000  # chat.postMessage truncates longer text; we cut it ourselves


@dataclass(frozen=True)
class CachedLookup:
    """A cached users.lookupByEmail answer; ``user_id`` None means "no such Slack user"."""

    user_id: str | None


class LookupCache(Protocol):
    """Where e-mail -> Slack user id answers are kept. Keys are lower-cased e-mail addresses.

    Methods are synchronous (a database-backed cache is called in a worker thread).
    """

    def get(self, email: str) -> CachedLookup | None:
        """The cached answer if it has not expired, else None."""

    def set(self, email: str, user_id: str | None, ttl: timedelta) -> None:
        """Remember an answer for ``ttl``."""


class MemoryLookupCache:
    """In-process LookupCache with expiry (the store provides a persistent one)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._items: dict[str, tuple[str | None, float]] = {}
        self._lock = threading.Lock()

    def get(self, email: str) -> CachedLookup | None:
        with self._lock:
            item = self._items.get(email)
            if item is None:
                return None
            user_id, expires = item
            if self._clock() >= expires:
                del self._items[email]
                return None
            return CachedLookup(user_id)

    def set(self, email: str, user_id: str | None, ttl: timedelta) -> None:
        with self._lock:
            self._items[email] = (user_id, self._clock() + ttl.total_seconds())


def _error_code(e: SlackApiError) -> str:
    try:
        code = e.response.get("error")
    except Exception:
        code = None
    return str(code) if code else f"HTTP {getattr(e.response, 'status_code', '?')}"


_NETWORK_ERRORS = (SlackApiError, SlackClientError, aiohttp.ClientError, TimeoutError, OSError)


def _classify(what: str, e: BaseException) -> DeliveryError:
    if isinstance(e, SlackApiError):
        code = _error_code(e)
        status = getattr(e.response, "status_code", 200)
        permanent = code in PERMANENT_ERRORS and status < 500
        return DeliveryError(f"slack {what}: {code}", permanent=permanent)
    return DeliveryError(f"slack {what}: {type(e).__name__}: {e}", permanent=False)


class SlackSender:
    """Sends rendered notices as Slack direct messages from the reaper's bot."""

    name = "slack"

    def __init__(
        self,
        token: str,
        *,
        base_url: str = "https://slack.com/api/",
        cache: LookupCache | None = None,
        found_ttl: timedelta = timedelta(days=7),
        not_found_ttl: timedelta = timedelta(hours=6),
        timeout: int = 30,
        rate_limit_retries: int = 2,
    ) -> None:
        if not token:
            raise ValueError("a Slack bot token is required")
        self.base_url = base_url
        self.cache: LookupCache = cache if cache is not None else MemoryLookupCache()
        self.found_ttl = found_ttl
        self.not_found_ttl = not_found_ttl
        self.client = AsyncWebClient(
            token=token,
            base_url=base_url,
            timeout=timeout,
            retry_handlers=[
                AsyncRateLimitErrorRetryHandler(max_retry_count=rate_limit_retries),
                AsyncConnectionErrorRetryHandler(max_retry_count=1),
                AsyncServerErrorRetryHandler(max_retry_count=1),
            ],
            logger=logging.getLogger("reaper.notify.slack.sdk"),
        )

    def __repr__(self) -> str:
        return f"SlackSender(base_url={self.base_url!r}, token=<hidden>)"

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except _NETWORK_ERRORS as e:
            raise _classify(what, e) from None

    async def lookup_user(self, email: str) -> str | None:
        """The Slack user id for an e-mail address (users.lookupByEmail), None if Slack has no such user.

        Answers, including "not found", are cached (found for ``found_ttl``, not found for
        ``not_found_ttl``). Other errors raise DeliveryError and are not cached.
        """
        key = email.strip().lower()
        cached = await asyncio.to_thread(self.cache.get, key)
        if cached is not None:
            return cached.user_id
        try:
            resp = await self.client.users_lookupByEmail(email=email.strip())
        except SlackApiError as e:
            if _error_code(e) == "users_not_found":
                log.info("slack: no user with the address %s", key)
                await asyncio.to_thread(self.cache.set, key, None, self.not_found_ttl)
                return None
            raise _classify("users.lookupByEmail", e) from None
        except _NETWORK_ERRORS as e:
            raise _classify("users.lookupByEmail", e) from None
        user = resp.get("user") or {}
        user_id = user.get("id")
        if not user_id:
            raise DeliveryError("slack users.lookupByEmail: answer without a user id", permanent=False)
        await asyncio.to_thread(self.cache.set, key, str(user_id), self.found_ttl)
        return str(user_id)

    async def send(self, slack_user_id: str, rendered: RenderedNotice) -> str:
        """DM one notice; returns the message ``ts``. Raises DeliveryError (see the module doc)."""
        opened = await self._call("conversations.open", self.client.conversations_open(users=slack_user_id))
        channel = (opened.get("channel") or {}).get("id")
        if not channel:
            raise DeliveryError("slack conversations.open: answer without a channel id", permanent=False)
        text = rendered.slack_text
        if len(text) > TEXT_LIMIT:
            text = text[: TEXT_LIMIT - 1] + "…"
        posted = await self._call(
            "chat.postMessage",
            self.client.chat_postMessage(
                channel=channel, text=text, blocks=rendered.slack_blocks, unfurl_links=False, unfurl_media=False,
            ),
        )
        ts = str(posted.get("ts") or "")
        log.info("notice %s sent on Slack to %s (ts %s)", rendered.kind, slack_user_id, ts)
        return ts

    async def send_to_email(self, email: str, rendered: RenderedNotice) -> str:
        """Look the user up by e-mail and DM them. ``users_not_found`` is a permanent DeliveryError
        (the caller falls back to e-mail and records it)."""
        user_id = await self.lookup_user(email)
        if user_id is None:
            raise DeliveryError(f"slack: users_not_found for {email}", permanent=True)
        return await self.send(user_id, rendered)

    async def aclose(self) -> None:
        session = getattr(self.client, "session", None)
        if session is not None and not session.closed:
            await session.close()


__all__ = ["SlackSender", "LookupCache", "MemoryLookupCache", "CachedLookup", "PERMANENT_ERRORS"]
