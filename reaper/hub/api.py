"""One call to the JupyterHub REST API, retried where retrying makes sense, over a Transport.

Connection errors, timeouts, 5xx and 429 are retried with exponential backoff and jitter; any other
answer (2xx, 3xx, 4xx) goes back to the caller as it came. The service's token is sent as
``Authorization: token ...`` and never appears in logs or exception text. Used by the hub client
(listing, stop, route table, the page's keep and stop). The page's login is JupyterHub's HubOAuth (reaper.web.auth).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any
from urllib.parse import urlencode

from .transport import Answer, Transport, TransportFailure, TransportTimeout

log = logging.getLogger(__name__)

PAGINATION_MEDIA_TYPE = "application/jupyterhub-pagination+json"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_BODY_SNIPPET = 200


class HubError(Exception):
    """A hub API call failed (after retries, where retrying made sense)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class HubListingError(HubError):
    """The active-user listing failed or was partial: the sweep must act on nobody."""


def backoff_delay(backoff: float, attempt: int) -> float:
    """Seconds to wait before retry ``attempt + 1``: exponential, with jitter."""
    return float(backoff * (2**attempt) * random.uniform(0.5, 1.5))


def redact(text: str, secrets: Collection[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class HubAPI:
    """The hub's REST API at ``api_url`` (``http://127.0.0.1:8081/hub/api``) with the service's
    ``token``. ``slots`` bounds the calls in flight unless a call brings its own; ``secrets`` are
    redacted from every error text besides the token."""

    def __init__(
        self,
        api_url: str,
        token: str,
        transport: Transport,
        *,
        slots: asyncio.Semaphore,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        secrets: Collection[str] = (),
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.transport = transport
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._token = token
        self._slots = slots
        self._secrets = frozenset({token, *secrets})

    def __repr__(self) -> str:  # never shows the token
        return f"HubAPI(api_url={self.api_url!r})"

    @property
    def token(self) -> str:
        """The service's API token (also the login's OAuth client secret)."""
        return self._token

    def url(self, *segments: str) -> str:
        """The API URL of already-quoted path segments."""
        return self.api_url + "/" + "/".join(segments)

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def snippet(self, answer: Answer) -> str:
        """The start of an answer's body, on one line, without secrets: for error texts."""
        return self.redact(" ".join(answer.text.split())[:_BODY_SNIPPET])

    async def call(
        self,
        method: str,
        url: str,
        *,
        what: str,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        seconds: float | None = None,
        retries: int | None = None,
        slots: asyncio.Semaphore | None = None,
    ) -> Answer:
        """One hub call with retries. Returns any non-retryable answer (2xx/3xx/4xx); raises
        HubError when retryable failures (transport errors, 5xx, 429) outlast the retries.
        ``headers`` add to (or replace) the token's ``Authorization`` and ``Accept: application/json``."""
        hdrs = {"Authorization": f"token {self._token}", "Accept": "application/json"}
        if headers:
            hdrs.update(headers)
        full = url + ("?" + urlencode(params) if params else "")
        seconds = seconds or self.timeout
        retries = self.retries if retries is None else retries
        last, status = "", None
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(backoff_delay(self.backoff, attempt - 1))
            try:
                async with slots or self._slots:
                    answer = await self.transport.send(method, full, hdrs, body, seconds)
            except TransportTimeout:
                last, status = f"timeout after {seconds:g}s", None
            except TransportFailure as exc:
                last, status = f"{exc.kind}: {self.redact(str(exc))}", None
            else:
                if answer.status not in RETRY_STATUSES:
                    return answer
                status = answer.status
                last = f"HTTP {status} {self.snippet(answer)}".rstrip()
            log.warning("hub %s: %s (attempt %d of %d)", what, last, attempt + 1, retries + 1)
        raise HubError(f"{what}: {last} after {retries + 1} attempts", status=status)

    def expect_ok(self, answer: Answer, what: str) -> None:
        """Raise HubError unless the answer is a 200."""
        if answer.status != 200:
            raise HubError(f"{what}: HTTP {answer.status} {self.snippet(answer)}".rstrip(), status=answer.status)

    @staticmethod
    def json(answer: Answer, what: str) -> Any:
        try:
            return answer.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HubError(f"{what}: invalid JSON ({exc.__class__.__name__})", status=answer.status) from None

    async def pages(
        self, url: str, what: str, *, page_size: int, params: Mapping[str, str] | None = None
    ) -> AsyncIterator[tuple[Any, int | None]]:
        """Yield (items, total) per page of a paginated hub collection; follows `_pagination.next`.

        ``items`` is whatever the hub puts there (a list of users, a dict of routes). For a hub
        that answers without the pagination envelope, yields (answer, None) for each offset until
        a page brings nothing new.
        """
        offset, limit = 0, page_size
        seen_plain: set[str] = set()
        while True:
            query: dict[str, str | int] = dict(params or {})
            query.update(offset=offset, limit=limit)
            at = f"{what} (offset {offset})"
            answer = await self.call("GET", url, what=at, params=query, headers={"Accept": PAGINATION_MEDIA_TYPE})
            self.expect_ok(answer, at)
            data = self.json(answer, at)
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
