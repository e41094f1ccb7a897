"""A loopback stand-in of the Slack Web API, for the methods the reaper calls, as Slack documents them.

- Every method is ``/api/<method>``; arguments come from the query string, a form body
  (``application/x-www-form-urlencoded``) or a JSON body, merged (Slack accepts all three).
- Auth: ``Authorization: Bearer xoxb-...`` (or a ``token`` argument). No token ->
  ``{"ok": false, "error": "not_authed"}``; an unknown one -> ``invalid_auth``. Errors answer HTTP 200
  with ``ok: false``, as Slack does.
- ``users.lookupByEmail`` (email): a known address -> ``{"ok": true, "user": {...}}``, else
  ``users_not_found``.
- ``conversations.open`` (users): one user id -> ``{"ok": true, "channel": {"id": "D..."}}``;
  an unknown id -> ``user_not_found``.
- ``chat.postMessage`` (channel, text, blocks): channel must be a DM opened above
  (``channel_not_found``); ``text`` is required here (Slack only warns without it; we want the
  fallback always); text over 40 000 characters -> ``msg_too_long``; blocks validated
  (``invalid_blocks``): a list (or JSON string of one) of at most 50 blocks, each with a known
  ``type``; a section's text is ``{"type": "mrkdwn"|"plain_text", "text": <=3000 chars}``; an actions
  block has 1..25 elements, each ``{"type": "button", "text": plain_text <=75, "url": http(s) <=3000,
  "action_id": unique <=255}``; a context block 1..10 elements.
- ``rate_limit_next(n, retry_after=1)``: the next n calls answer 429 with ``Retry-After``.
- ``fail_next(method, error, status=200)``: the next call of that method fails with that error.
- ``calls``: every call, in order (method, args, the bearer token seen, monotonic time).
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

BLOCK_TYPES = {"section", "context", "actions", "divider", "header", "image", "input", "rich_text", "file", "video"}


@dataclass
class Call:
    method: str
    http_method: str
    args: dict[str, Any]
    token: str | None
    content_type: str
    at: float
    status: int = 200
    response: dict[str, Any] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def validate_blocks(blocks: Any) -> list[str]:
    """Problems with a Block Kit payload (empty when valid), in the spirit of Slack's invalid_blocks."""
    if isinstance(blocks, str):
        try:
            blocks = json.loads(blocks)
        except ValueError:
            return ["blocks is not JSON"]
    if not isinstance(blocks, list):
        return ["blocks must be an array"]
    if len(blocks) > 50:
        return ["no more than 50 items allowed [json-pointer:/blocks]"]
    errors: list[str] = []
    action_ids: set[str] = set()
    for i, b in enumerate(blocks):
        where = f"[json-pointer:/blocks/{i}]"
        if not isinstance(b, dict) or b.get("type") not in BLOCK_TYPES:
            errors.append(f"unknown or missing block type {where}")
            continue
        t = b["type"]
        if t == "section":
            text = b.get("text")
            if not isinstance(text, dict) or text.get("type") not in ("mrkdwn", "plain_text"):
                errors.append(f"section text must be a text object {where}/text")
            elif not isinstance(text.get("text"), str) or not 1 <= len(text["text"]) <= 3000:
                errors.append(f"section text must be 1..3000 characters {where}/text/text")
        elif t == "context":
            els = b.get("elements")
            if not isinstance(els, list) or not 1 <= len(els) <= 10:
                errors.append(f"context needs 1..10 elements {where}/elements")
            else:
                for j, e in enumerate(els):
                    if not isinstance(e, dict) or e.get("type") not in ("mrkdwn", "plain_text", "image"):
                        errors.append(f"bad context element {where}/elements/{j}")
        elif t == "actions":
            els = b.get("elements")
            if not isinstance(els, list) or not 1 <= len(els) <= 25:
                errors.append(f"actions needs 1..25 elements {where}/elements")
                continue
            for j, e in enumerate(els):
                ew = f"{where}/elements/{j}"
                if not isinstance(e, dict) or e.get("type") != "button":
                    errors.append(f"only buttons are expected here {ew}")
                    continue
                txt = e.get("text")
                if not isinstance(txt, dict) or txt.get("type") != "plain_text" or not (
                    isinstance(txt.get("text"), str) and 1 <= len(txt["text"]) <= 75
                ):
                    errors.append(f"button text must be plain_text of 1..75 characters {ew}/text")
                url = e.get("url")
                if url is not None and (
                    not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 3000
                ):
                    errors.append(f"button url must be http(s) and at most 3000 characters {ew}/url")
                aid = e.get("action_id")
                if aid is not None:
                    if not isinstance(aid, str) or len(aid) > 255 or aid in action_ids:
                        errors.append(f"action_id must be unique and at most 255 characters {ew}/action_id")
                    action_ids.add(aid)
                if e.get("style") not in (None, "primary", "danger"):
                    errors.append(f"style must be primary or danger {ew}/style")
    return errors


class SlackStandin:
    def __init__(self, *, tokens: set[str] | None = None, users: dict[str, str] | None = None) -> None:
        self.tokens = tokens if tokens is not None else {"xoxb-test-token"}
        self.users = dict(users or {})  # email (lower case) -> user id
        self.calls: list[Call] = []
        self.messages: list[dict[str, Any]] = []  # accepted chat.postMessage arguments
        self.channels: dict[str, str] = {}  # channel id -> user id
        self._rate_limited = 0
        self._retry_after = 1
        self._failures: dict[str, list[tuple[str, int]]] = {}
        self.port = _free_port()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def rate_limit_next(self, n: int, retry_after: int = 1) -> None:
        self._rate_limited = n
        self._retry_after = retry_after

    def fail_next(self, method: str, error: str, status: int = 200) -> None:
        self._failures.setdefault(method, []).append((error, status))

    async def start(self) -> SlackStandin:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SlackStandin:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _args(self, request: web.Request) -> dict[str, Any]:
        args: dict[str, Any] = dict(request.query)
        if request.method == "POST" and request.can_read_body:
            ctype = request.content_type
            if ctype == "application/json":
                body = await request.json()
                if isinstance(body, dict):
                    args.update(body)
            elif ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
                args.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
        return args

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args = await self._args(request)
        auth = request.headers.get("Authorization", "")
        token = auth[7:].strip() if auth.startswith("Bearer ") else args.pop("token", None)
        call = Call(method, request.method, args, token, request.content_type, time.monotonic())
        self.calls.append(call)

        def answer(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
            call.status, call.response = status, body
            return web.json_response(body, status=status, headers=headers)

        if self._rate_limited > 0:
            self._rate_limited -= 1
            return answer({"ok": False, "error": "ratelimited"}, 429, {"Retry-After": str(self._retry_after)})
        if not token:
            return answer({"ok": False, "error": "not_authed"})
        if token not in self.tokens:
            return answer({"ok": False, "error": "invalid_auth"})
        if self._failures.get(method):
            error, status = self._failures[method].pop(0)
            return answer({"ok": False, "error": error}, status)
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return answer({"ok": False, "error": "unknown_method"})
        return answer(handler(args))

    def _m_users_lookupByEmail(self, args: dict[str, Any]) -> dict[str, Any]:
        email = str(args.get("email") or "").lower()
        if not email:
            return {"ok": False, "error": "invalid_arguments"}
        uid = self.users.get(email)
        if uid is None:
            return {"ok": False, "error": "users_not_found"}
        return {"ok": True, "user": {"id": uid, "team_id": "T0001", "name": email.split("@")[0],
                                      "deleted": False, "profile": {"email": email}}}

    def _m_conversations_open(self, args: dict[str, Any]) -> dict[str, Any]:
        users = [u for u in str(args.get("users") or "").split(",") if u]
        if not users:
            return {"ok": False, "error": "users_list_not_supplied"}
        if len(users) != 1:
            return {"ok": False, "error": "not_enough_users"}  # an MPIM: not what we do
        uid = users[0]
        if uid not in self.users.values():
            return {"ok": False, "error": "user_not_found"}
        channel = "D" + uid[1:]
        self.channels[channel] = uid
        return {"ok": True, "channel": {"id": channel}}

    def _m_chat_postMessage(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = args.get("channel")
        if not channel or channel not in self.channels:
            return {"ok": False, "error": "channel_not_found"}
        text = args.get("text")
        if not isinstance(text, str) or not text.strip():
            return {"ok": False, "error": "no_text"}
        if len(text) > 40000:
            return {"ok": False, "error": "msg_too_long"}
        if "blocks" in args:
            errors = validate_blocks(args["blocks"])
            if errors:
                return {"ok": False, "error": "invalid_blocks", "errors": errors}
        self.messages.append(args)
        ts = f"{time.time():.6f}"
        return {"ok": True, "channel": channel, "ts": ts, "message": {"text": text, "ts": ts}}
