"""SlackSender against a loopback stand-in of the Slack Web API (slack-sdk's base_url).

Real parts: slack-sdk's AsyncWebClient and retry handlers over real HTTP to an aiohttp server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from reaper.core.model import NoticeKind
from reaper.notify.outbox import DeliveryError
from reaper.notify.render import render, sample_context
from reaper.notify.slack import MemoryLookupCache, SlackSender

from .slack_standin import SlackStandin, validate_blocks

TOKEN = "xoxb-test-token"


@pytest.fixture
async def slack() -> AsyncIterator[SlackStandin]:
    async with SlackStandin(tokens={TOKEN}, users={"alice@example.org": "U0ALICE"}) as s:
        yield s


def sender(slack: SlackStandin, token: str = TOKEN, **kw: object) -> SlackSender:
    return SlackSender(token, base_url=slack.base_url, **kw)  # type: ignore[arg-type]


async def test_lookup_then_dm_sends_the_documented_payloads(slack: SlackStandin) -> None:
    s = sender(slack)
    rendered = render(NoticeKind.WARNING, sample_context())
    uid = await s.lookup_user("Alice@Example.org")
    assert uid == "U0ALICE"
    ts = await s.send(uid, rendered)
    assert ts

    lookup, opened, posted = slack.calls
    assert (lookup.method, lookup.http_method, lookup.args) == ("users.lookupByEmail", "GET",
                                                                 {"email": "Alice@Example.org"})
    assert opened.method == "conversations.open" and opened.args["users"] == "U0ALICE"
    assert posted.method == "chat.postMessage" and posted.content_type == "application/json"
    assert all(c.token == TOKEN and c.status == 200 and c.response["ok"] for c in slack.calls)

    [msg] = slack.messages
    assert msg["channel"] == "D0ALICE"
    assert msg["text"] == rendered.slack_text  # the notification fallback
    assert msg["blocks"] == rendered.slack_blocks
    assert validate_blocks(msg["blocks"]) == []
    section = msg["blocks"][0]
    assert section["type"] == "section" and section["text"]["type"] == "mrkdwn"
    assert "14:00 EST, Wed 25 Nov" in section["text"]["text"]
    [actions] = [b for b in msg["blocks"] if b["type"] == "actions"]
    assert [(e["text"]["text"], e["url"]) for e in actions["elements"]] == [
        ("Keep running for 2h", "https://hub.example.org/services/reaper/keep-link?t=SAMPLE.TOKEN"),
        ("Open my server", "https://hub.example.org/user/alice/gpu1/"),
        ("Control panel", "https://hub.example.org/hub/home"),
    ]
    assert actions["elements"][0]["style"] == "primary"
    assert msg["unfurl_links"] is False


@pytest.mark.parametrize("kind", list(NoticeKind))
async def test_every_notice_kind_is_accepted_by_the_block_validation(slack: SlackStandin, kind: NoticeKind) -> None:
    await sender(slack).send("U0ALICE", render(kind, sample_context()))
    assert len(slack.messages) == 1


async def test_429_is_honoured_by_waiting_retry_after_then_retrying(slack: SlackStandin) -> None:
    s = sender(slack)
    slack.rate_limit_next(1, retry_after=1)
    t0 = time.monotonic()
    await s.send("U0ALICE", render(NoticeKind.FINAL, sample_context()))
    first, second = slack.calls_to("conversations.open")
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 1.0  # waited at least Retry-After
    assert time.monotonic() - t0 < 5
    assert len(slack.messages) == 1


async def test_rate_limited_beyond_the_retries_is_a_temporary_failure(slack: SlackStandin) -> None:
    s = sender(slack, rate_limit_retries=1)
    slack.rate_limit_next(5, retry_after=1)
    with pytest.raises(DeliveryError) as e:
        await s.send("U0ALICE", render(NoticeKind.WARNING, sample_context()))
    assert e.value.permanent is False and "ratelimited" in str(e.value)
    assert len(slack.calls_to("conversations.open")) == 2  # the first try and one retry
    assert slack.messages == []


async def test_users_not_found_gives_none_and_is_cached(slack: SlackStandin) -> None:
    s = sender(slack)
    assert await s.lookup_user("nobody@example.org") is None
    assert await s.lookup_user("nobody@example.org") is None
    assert len(slack.calls_to("users.lookupByEmail")) == 1
    with pytest.raises(DeliveryError) as e:
        await s.send_to_email("nobody@example.org", render(NoticeKind.WARNING, sample_context()))
    assert e.value.permanent is True and "users_not_found" in str(e.value)


async def test_the_cache_avoids_a_second_lookup_until_it_expires(slack: SlackStandin) -> None:
    now = [1000.0]
    cache = MemoryLookupCache(clock=lambda: now[0])
    s = sender(slack, cache=cache, found_ttl=timedelta(hours=1))
    assert await s.lookup_user("alice@example.org") == "U0ALICE"
    assert await s.lookup_user("ALICE@example.org") == "U0ALICE"
    assert len(slack.calls_to("users.lookupByEmail")) == 1
    # a second sender sharing the cache (the service after a reload) does not ask either
    assert await sender(slack, cache=cache).lookup_user("alice@example.org") == "U0ALICE"
    assert len(slack.calls_to("users.lookupByEmail")) == 1
    now[0] += 3601
    assert await s.lookup_user("alice@example.org") == "U0ALICE"
    assert len(slack.calls_to("users.lookupByEmail")) == 2


async def test_invalid_token_is_permanent_and_never_logged(slack: SlackStandin, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bad = "xoxb-not-the-right-one"
    s = sender(slack, token=bad)
    with pytest.raises(DeliveryError) as e:
        await s.send("U0ALICE", render(NoticeKind.WARNING, sample_context()))
    assert e.value.permanent is True and "invalid_auth" in str(e.value)
    with pytest.raises(DeliveryError) as e2:
        await s.lookup_user("alice@example.org")
    assert e2.value.permanent is True
    assert slack.calls[0].token == bad  # it was sent, as a bearer header
    assert bad not in caplog.text and bad not in repr(s) and bad not in str(e.value)


async def test_missing_bearer_header_is_refused_by_the_standin(slack: SlackStandin) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.post(slack.base_url + "chat.postMessage", json={"channel": "D0ALICE", "text": "x"}) as r:
            assert (await r.json()) == {"ok": False, "error": "not_authed"}


@pytest.mark.parametrize("error", ["account_inactive", "not_authed", "channel_not_found"])
async def test_dead_account_or_channel_is_permanent(slack: SlackStandin, error: str) -> None:
    slack.fail_next("chat.postMessage", error)
    with pytest.raises(DeliveryError) as e:
        await sender(slack).send("U0ALICE", render(NoticeKind.WARNING, sample_context()))
    assert e.value.permanent is True and error in str(e.value)


async def test_unknown_user_id_is_permanent(slack: SlackStandin) -> None:
    with pytest.raises(DeliveryError) as e:
        await sender(slack).send("U0NOBODY", render(NoticeKind.WARNING, sample_context()))
    assert e.value.permanent is True and "user_not_found" in str(e.value)


async def test_server_errors_are_retried_once_then_temporary(slack: SlackStandin) -> None:
    slack.fail_next("chat.postMessage", "internal_error", status=500)
    await sender(slack).send("U0ALICE", render(NoticeKind.WARNING, sample_context()))
    assert [c.status for c in slack.calls_to("chat.postMessage")] == [500, 200]
    assert len(slack.messages) == 1

    slack.fail_next("chat.postMessage", "internal_error", status=503)
    slack.fail_next("chat.postMessage", "internal_error", status=503)
    with pytest.raises(DeliveryError) as e:
        await sender(slack).send("U0ALICE", render(NoticeKind.WARNING, sample_context()))
    assert e.value.permanent is False
    assert len(slack.messages) == 1


async def test_slack_unreachable_is_temporary() -> None:
    standin = SlackStandin()  # never started: the port refuses connections
    with pytest.raises(DeliveryError) as e:
        await SlackSender(TOKEN, base_url=standin.base_url).send("U0ALICE", render(NoticeKind.FINAL, sample_context()))
    assert e.value.permanent is False


async def test_hostile_names_cannot_mention_everyone_or_break_the_message(slack: SlackStandin) -> None:
    from dataclasses import replace

    ctx = replace(sample_context(), server_name="<!channel> & <https://evil.example|click>", server_label="")
    await sender(slack).send("U0ALICE", render(NoticeKind.WARNING, ctx))
    [msg] = slack.messages
    assert "<!channel>" not in msg["text"] and "&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;" in msg["text"]


def test_the_block_validator_rejects_what_slack_rejects() -> None:
    assert validate_blocks([{"type": "section", "text": {"type": "markdown!", "text": "x"}}])
    assert validate_blocks([{"type": "actions", "elements": [{"type": "button", "text": {"type": "mrkdwn", "text": "x"}}]}])
    assert validate_blocks([{"type": "actions", "elements": [
        {"type": "button", "text": {"type": "plain_text", "text": "x"}, "url": "javascript:alert(1)"}]}])
    assert validate_blocks([{"type": "section", "text": {"type": "mrkdwn", "text": "x" * 3001}}])
    assert validate_blocks("not json")
    assert validate_blocks([{"type": "divider"}]) == []
