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


# --- the one-click keep link of a delivered notice ------------------------------------------------


def _token_of(url: str) -> str:
    from urllib.parse import parse_qs, urlsplit

    assert urlsplit(url).path == "/services/reaper/keep-link", url
    return parse_qs(urlsplit(url).query)["t"][0]


async def test_a_delivered_notice_carries_one_signed_keep_link_on_every_channel_as_a_slack_button(parts):
    """The Slack DM's "Keep running for 2h" button and the e-mail's link are the same signed link:
    for this run and this notice, until the notice's scheduled stop (one use in all)."""
    import re

    from reaper.notify.keeplinks import verify

    slack, sink, store = parts
    s = settings(slack.base_url, sink.port)
    server = HubServer(user="alice", name="gpu1", started=T0 - timedelta(hours=3), last_activity=T0 - timedelta(hours=2),
                       url="/user/alice/gpu1/")
    obs = Observation(server=server, state=State.DETACHED, at=T0, last_activity=T0 - timedelta(hours=2),
                      detached_since=T0 - timedelta(hours=2))
    stop = T0 + timedelta(hours=1)
    dec = Decision(Action.WARN, "window closed, no activity for 2h", notice=NoticeKind.WARNING, spell=obs.idle_since,
                   stop_at=stop, channels=("slack", "email"))
    nid = store.runs.record(obs, dec, T0)
    assert nid is not None
    assert await make_outbox(s, store).drain(T0) == 2
    [post] = slack.calls_to("chat.postMessage")
    [actions] = [b for b in post.args["blocks"] if b["type"] == "actions"]
    keep = actions["elements"][0]
    assert keep["text"]["text"] == "Keep running for 2h" and keep["style"] == "primary"
    token = _token_of(keep["url"])
    [mail] = sink.messages
    text = mail.message.get_body(("plain",)).get_content()
    html = mail.message.get_body(("html",)).get_content()
    m = re.search(r"one click keeps it running for 2h: (\S+)", text)
    assert m and _token_of(m.group(1)) == token
    assert 'href="' + keep["url"].replace("&", "&amp;") + '"' in html or keep["url"] in html
    link = verify(store.keeplinks.secret(), token, T0)
    assert (link.user, link.server, link.started, link.notice, link.expires) == (
        "alice", "gpu1", server.started, nid, stop)


async def test_the_keep_link_is_signed_with_web_link_secret_when_configured(parts):
    from reaper.notify.channels import render_delivery
    from reaper.notify.keeplinks import LinkInvalid, resolve_secret, verify

    slack, sink, store = parts
    s = parse_settings('hub: {public_url: "https://hub.example.org"}\nweb: {link_secret: "${LINK_SECRET}"}\n',
                       env={"LINK_SECRET": "s3cret-from-the-environment"})
    record_warning(store, "alice")
    [d] = store.outbox.due_deliveries(T0, 10)
    secret = resolve_secret(s.web.link_secret, store)
    assert secret == b"s3cret-from-the-environment"
    import re

    url = re.search(r"(https://\S+keep-link\S+)", render_delivery(d, s, T0, secret=secret).text).group(1)
    assert verify(secret, _token_of(url), T0).user == "alice"
    with pytest.raises(LinkInvalid):
        verify(store.keeplinks.secret(), _token_of(url), T0)  # not the generated one


def test_link_secret_refuses_a_literal_value_in_the_file() -> None:
    with pytest.raises(Exception, match="link_secret"):
        parse_settings('web: {link_secret: "written-in-the-file"}\n', env={})


def test_the_generated_secret_is_made_once_and_kept_in_the_store(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    a = Store.open(url)
    try:
        first = a.keeplinks.secret()
        assert len(first) == 32
    finally:
        a.close()
    b = Store.open(url)
    try:
        assert b.keeplinks.secret() == first  # a restarted reaper signs and checks with the same key
    finally:
        b.close()


def test_a_named_servers_display_name_goes_from_the_hub_model_to_the_notice() -> None:
    from reaper.hub.models import servers_from_user
    from reaper.notify.render import context_from, render
    from reaper.store import notice_context

    user = {"name": "alice", "servers": {
        "gpu1": {"name": "gpu1", "display_name": "Thesis runs", "started": "2026-11-25T15:00:00Z",
                 "last_activity": "2026-11-25T16:00:00Z", "ready": True, "url": "/user/alice/gpu1/"},
        "": {"name": "", "display_name": "", "started": "2026-11-25T15:00:00Z", "ready": True, "url": "/user/alice/"},
    }}
    by_name = {s.name: s for s in servers_from_user(user)}
    assert by_name["gpu1"].display_name == "Thesis runs" and by_name[""].display_name is None
    obs = Observation(server=by_name["gpu1"], state=State.DETACHED, at=T0, last_activity=T0 - timedelta(hours=2),
                      detached_since=T0 - timedelta(hours=2))
    stored = notice_context(obs, Decision(Action.WARN, "idle"), T0)
    from reaper.store import NoticeContext

    again = NoticeContext.from_json(stored.to_json())
    assert again.display_name == "Thesis runs"
    ctx = context_from(again, public_url="https://hub.example.org", tz="UTC", now=T0)
    assert render(NoticeKind.WARNING, ctx).text.startswith('Your server "gpu1" (Thesis runs) on')


async def test_a_sweeps_notice_records_what_the_batch_job_holds_and_the_mail_says_so(tmp_path):
    """The hub's options of our spawner name memory only ("holding 4 GB" before); the sweep's batch
    job knows CPUs, memory and GPUs, and the queued notice keeps them."""
    from sqlalchemy import select

    from reaper.batch.base import Job, JobState
    from reaper.core.model import Kernel, Probe
    from reaper.notify.channels import template_context
    from reaper.notify.outbox import LogChannel, Outbox
    from reaper.notify.render import render
    from reaper.store import NoticeContext
    from reaper.store.models import NOTICES
    from reaper.sweep import Sweeper
    from tests.fakes import FakeHub

    st = parse_settings("""
hub: {public_url: "https://hub.example.org", timezone: UTC}
defaults:
  detached: {warn_after: 1h, stop_after: 3h}
  channels: [log]
""", env={})
    now = datetime.now(UTC)
    since = now - timedelta(hours=2)
    hub = FakeHub()
    srv = HubServer(user="alice", name="", started=now - timedelta(hours=5), last_activity=since, url="/user/alice/",
                    target="http://127.0.0.1:1", state={"job_id": "7"}, user_options={"memory": "4G"})
    hub.add(srv, Probe(ok=True, status_last_activity=since, kernels=(Kernel("k", "python3", "idle", 0, since),)))
    job = Job(id="7", user="alice", name="jupyterhub", state=JobState.RUNNING, node="cn-a001", cpus=4,
              mem_mb=16384, gpus=1)

    class Guard:  # the batch guard (reaper.ports.Guard) with the hub's one job
        async def hub_jobs(self):
            return {"7": job}

        async def reconcile(self, servers, jobs, now, *, dry_run=False):
            return []

        async def after_stop(self, server, outcome, now):
            return None

    store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    try:
        sw = Sweeper(st, hub, store, notifier=Outbox(store, {"log": LogChannel()}))
        sw.stop_hook = Guard()
        await sw.run_once()
        with store.db.read() as s:  # the notice as stored (the sweep delivered it to the log already)
            [stored] = s.execute(select(NOTICES.c.context).where(NOTICES.c.kind == "warning")).scalars().all()
        notice = NoticeContext.from_json(stored)
        assert notice.held == {"cpus": 4, "mem_mb": 16384, "gpus": 1}
        assert "Holds: 4 CPUs, 1 GPU, 16 GB." in render(NoticeKind.WARNING, template_context("warning", notice, st, now)).text
    finally:
        store.close()
