"""The outbox's Slack and e-mail channels over the real store: a stored notice is rendered and sent;
a user unknown to Slack gets it by e-mail instead, and that is recorded. Real parts: the Slack
stand-in (loopback, checks token, methods and payloads), aiosmtpd, SQLite."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from reaper.config import parse_settings
from reaper.core.model import Action, Decision, HubServer, NoticeKind, Observation, State
from reaper.service import make_outbox
from reaper.store import Store

from .slack_standin import SlackStandin
from .smtp_sink import SmtpSink

T0 = datetime(2026, 11, 25, 18, 0, tzinfo=UTC)
TOKEN = "xoxb-test-token-123"


def settings(slack_url: str, smtp_port: int):
    return parse_settings(
        f"""
hub: {{public_url: "https://hub.example.org", timezone: America/Montreal}}
defaults: {{channels: [slack]}}
notify:
  email: {{host: 127.0.0.1, port: {smtp_port}, security: none, from_addr: "hub@example.org",
           address_template: "{{username}}@example.org"}}
  slack: {{token: "${{SLACK_BOT_TOKEN}}", base_url: "{slack_url}"}}
""",
        env={"SLACK_BOT_TOKEN": TOKEN},
    )


def record_warning(store: Store, user: str) -> None:
    server = HubServer(user=user, name="gpu1", started=T0 - timedelta(hours=3),
                       last_activity=T0 - timedelta(hours=2), url=f"/user/{user}/gpu1/",
                       user_options={"partition": "main", "gpus": 1}, state={"job_id": "42", "job_status": "RUNNING cn-a001"})
    obs = Observation(server=server, state=State.DETACHED, at=T0, last_activity=T0 - timedelta(hours=2),
                      detached_since=T0 - timedelta(hours=2), detail="1 kernel (1 idle), 0 connections")
    dec = Decision(Action.WARN, "window closed, no activity for 2h; warning now, stop at 15:00",
                   notice=NoticeKind.WARNING, spell=obs.idle_since, stop_at=T0 + timedelta(hours=1),
                   channels=("slack",))
    assert store.runs.record(obs, dec, T0) is not None


@pytest.fixture
async def parts(tmp_path):
    slack = SlackStandin(tokens={TOKEN}, users={"alice@example.org": "U0ALICE"})
    await slack.start()
    sink = SmtpSink().start()
    store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    yield slack, sink, store
    store.close()
    sink.stop()
    await slack.stop()


async def test_slack_notice_is_looked_up_by_email_and_sent_as_a_dm_with_the_server_and_job(parts):
    slack, sink, store = parts
    outbox = make_outbox(settings(slack.base_url, sink.port), store)
    record_warning(store, "alice")
    assert await outbox.drain(T0) == 1
    assert [c.args["email"] for c in slack.calls_to("users.lookupByEmail")] == ["alice@example.org"]
    post = slack.calls_to("chat.postMessage")[0]
    assert post.token == TOKEN
    assert "gpu1" in post.args["text"] and "42" in post.args["text"]
    assert sink.messages == []


async def test_user_unknown_to_slack_gets_the_notice_by_email_and_it_is_recorded(parts):
    slack, sink, store = parts
    outbox = make_outbox(settings(slack.base_url, sink.port), store)
    record_warning(store, "carol")  # not in the Slack workspace
    assert await outbox.drain(T0) == 1
    assert slack.calls_to("chat.postMessage") == []
    assert [m.rcpt_tos for m in sink.messages] == [["carol@example.org"]]
    acts = store.reports.recent_actions(T0 - timedelta(hours=1))
    assert any(a.kind == "slack-fallback" and a.user == "carol" for a in acts)


async def test_invalid_slack_token_fails_permanently_and_is_visible(parts, tmp_path):
    slack, sink, store = parts
    s = settings(slack.base_url, sink.port)
    s2 = s.model_copy(update={"notify": s.notify.model_copy(update={
        "slack": s.notify.slack.model_copy(update={"token": "xoxb-wrong", "fallback_to_email": False})})})
    outbox = make_outbox(s2, store)
    record_warning(store, "alice")
    assert await outbox.drain(T0) == 0
    notes = store.reports.recent_notices(T0 - timedelta(hours=1))
    assert notes[0].status == "failed"
    assert "invalid_auth" in (notes[0].deliveries[0].last_error or "")
    assert outbox.failed == 1


async def test_slack_lookups_are_cached_in_the_store_across_a_restart(parts):
    slack, sink, store = parts
    record_warning(store, "alice")
    assert await make_outbox(settings(slack.base_url, sink.port), store).drain(T0) == 1
    # a restarted reaper: new channels, the same database
    server = HubServer(user="alice", name="gpu2", started=T0 - timedelta(hours=1),
                       last_activity=T0 - timedelta(hours=2), url="/user/alice/gpu2/")
    obs = Observation(server=server, state=State.DETACHED, at=T0, last_activity=T0 - timedelta(hours=2),
                      detached_since=T0 - timedelta(hours=2))
    dec = Decision(Action.WARN, "idle", notice=NoticeKind.WARNING, spell=obs.idle_since, channels=("slack",))
    assert store.runs.record(obs, dec, T0) is not None
    assert await make_outbox(settings(slack.base_url, sink.port), store).drain(T0) == 1
    assert len(slack.calls_to("users.lookupByEmail")) == 1  # the second reaper used the stored answer
    assert len(slack.calls_to("chat.postMessage")) == 2


def test_keep_link_points_at_this_servers_card_under_the_pages_own_prefix() -> None:
    from reaper.notify.channels import keep_url

    def link(yaml: str, user: str = "alice", server: str = "gpu1", env: dict[str, str] | None = None) -> str:
        return keep_url(parse_settings(yaml, env={}), user, server, env=env or {})

    plain = 'hub: {public_url: "https://hub.example.org"}'
    assert link(plain) == "https://hub.example.org/services/reaper/#server-alice-gpu1"
    assert link(plain, "bob", "") == "https://hub.example.org/services/reaper/#server-bob-default"
    # the configured prefix, else the one the hub gives the service (it holds the hub's base_url)
    assert link(plain + "\nweb: {prefix: /reaper-page}") == "https://hub.example.org/reaper-page/#server-alice-gpu1"
    under = 'hub: {public_url: "https://example.org/jh"}'
    assert link(under, env={"JUPYTERHUB_SERVICE_PREFIX": "/jh/services/idle/"}) == \
        "https://example.org/jh/services/idle/#server-alice-gpu1"
    assert link(plain, "a b", "x/y") == "https://hub.example.org/services/reaper/#server-a%20b-x%2Fy"


async def test_a_stored_notice_carries_the_keep_link_of_its_server(parts):
    from reaper.notify.channels import render_delivery

    store = parts[2]
    st = parse_settings('hub: {public_url: "https://hub.example.org"}\nweb: {prefix: /jh/services/reaper/}', env={})
    record_warning(store, "alice")
    [delivery] = store.outbox.due_deliveries(T0, 10)
    text = render_delivery(delivery, st, T0).text
    assert "https://hub.example.org/jh/services/reaper/#server-alice-gpu1" in text


def test_a_reminder_says_which_notice_of_its_spell_it_is(tmp_path) -> None:
    """The warning is notice 1, the first reminder notice 2, the second notice 3 (before, every
    reminder said "notice 1": the number was read from a context key never stored)."""
    from reaper.notify.channels import render_delivery

    s = parse_settings('hub: {public_url: "https://hub.example.org"}\n')
    store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    try:
        record_warning(store, "alice")
        key = store.runs.open_runs()[0]
        spell = T0 - timedelta(hours=2)
        for n in (1, 2):
            from reaper.store import NoticeContext

            store.outbox.add_notice(key, NoticeKind.REMINDER, spell, T0 + timedelta(hours=n), channels=["log"],
                                    context=NoticeContext(user="alice", server="gpu1", started=key.started))
        due = sorted(store.outbox.due_deliveries(T0 + timedelta(hours=3)), key=lambda d: d.id)
        texts = [render_delivery(d, s, T0 + timedelta(hours=3)).text for d in due if d.kind is NoticeKind.REMINDER]
        assert [("(notice 2)" in t, "(notice 3)" in t) for t in texts] == [(True, False), (False, True)]
    finally:
        store.close()
