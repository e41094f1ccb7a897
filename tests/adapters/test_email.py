"""EmailSender against a real SMTP server (aiosmtpd) on loopback. Real parts: aiosmtpd, aiosmtplib."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import parseaddr, parsedate_to_datetime
from pathlib import Path

import pytest

from reaper.core.model import NoticeKind
from reaper.notify.email import EmailSender, resolve_address, valid_address
from reaper.notify.outbox import DeliveryError
from reaper.notify.render import TemplateContext, render, sample_context

from .smtp_sink import SmtpSink, TlsFiles, free_port, make_self_signed

FROM = "Hub reaper <reaper@hub.example.org>"


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_self_signed(tmp_path_factory.mktemp("tls"))


def plain_sender(sink: SmtpSink, **kw: object) -> EmailSender:
    return EmailSender(sink.host, sink.port, security="none", from_addr=FROM,
                       reply_to="help@hub.example.org", list_id="reaper.hub.example.org", timeout=5, **kw)


def parts(msg: EmailMessage) -> tuple[str, str]:
    text = msg.get_body(preferencelist=("plain",))
    html = msg.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


@pytest.mark.parametrize("kind", list(NoticeKind))
async def test_each_notice_kind_arrives_as_multipart_with_filterable_headers_links_and_hub_times(
    sink: SmtpSink, kind: NoticeKind
) -> None:
    ctx = sample_context()
    rendered = render(kind, ctx)
    msgid = await plain_sender(sink).send("alice@example.org", rendered)

    [got] = sink.messages
    msg = got.message
    assert got.rcpt_tos == ["alice@example.org"]
    assert parseaddr(str(msg["From"]))[1] == "reaper@hub.example.org"
    assert str(msg["To"]) == "alice@example.org"
    assert str(msg["Reply-To"]) == "help@hub.example.org"
    assert "<reaper.hub.example.org>" in str(msg["List-Id"])
    assert str(msg["Auto-Submitted"]) == "auto-generated"
    assert str(msg["X-Reaper-Notice"]) == kind.value
    assert str(msg["Message-ID"]) == msgid and msgid.endswith("@hub.example.org>")
    assert abs(parsedate_to_datetime(str(msg["Date"])) - datetime.now(UTC)) < timedelta(minutes=1)
    assert str(msg["Subject"]) == rendered.subject and "Example JupyterHub" in rendered.subject
    assert msg.get_content_type() == "multipart/alternative"
    text, html = parts(msg)
    # Links: every notice points at the Control Panel, in both parts.
    assert ctx.control_panel_url in text and f'href="{ctx.control_panel_url}"' in html
    if kind in (NoticeKind.WARNING, NoticeKind.REMINDER, NoticeKind.FINAL):
        for url in (ctx.server_url, ctx.keep_url):
            assert url and url in text and f'href="{url}"' in html
        assert "Stop My Server" in text and "Stop My Server" in html
        # stop_at is 18:18Z + 42 min = 14:00 in Toronto (EST in November): shown in the hub's zone.
        assert "14:00 EST, Wed 25 Nov" in text and "14:00 EST, Wed 25 Nov" in html
        assert "in 42 min" in text
        assert "Slurm job 4242 on node cn-a001" in text
        assert "no browser connected since 10:05" in text
    if kind is NoticeKind.STOPPED:
        assert "4 CPUs, 1 GPU, 16 GB for 5h20m" in text and "4 CPUs, 1 GPU, 16 GB for 5h20m" in html
        assert "13:18 EST, Wed 25 Nov" in text
    if kind is NoticeKind.WALLTIME:
        assert "09:18 EST, Thu 26 Nov" in text
    if kind is NoticeKind.FINAL:
        assert str(msg["Subject"]).startswith("[Example JupyterHub] Final notice")


async def test_cc_and_extra_headers_reach_the_server(sink: SmtpSink) -> None:
    rendered = render(NoticeKind.STOPPED, sample_context())
    await plain_sender(sink).send(["alice@example.org"], rendered, cc="admins@hub.example.org",
                                  headers={"X-Reaper-Run": "alice/gpu1@2026-11-25T10:00Z"})
    [got] = sink.messages
    assert sorted(got.rcpt_tos) == ["admins@hub.example.org", "alice@example.org"]
    assert str(got.message["Cc"]) == "admins@hub.example.org"
    assert str(got.message["X-Reaper-Run"]) == "alice/gpu1@2026-11-25T10:00Z"


async def test_starttls_with_auth_delivers_over_tls_as_the_configured_user(tls_files: TlsFiles) -> None:
    with SmtpSink(tls=tls_files, require_starttls=True, users={"reaper": "s3cret"}) as sink:
        sender = EmailSender(sink.host, sink.port, security="starttls", username="reaper", password="s3cret",
                             from_addr=FROM, cert_bundle=tls_files.cert, timeout=5)
        await sender.send("alice@example.org", render(NoticeKind.WARNING, sample_context()))
        [got] = sink.messages
        assert got.tls is True
        assert got.authenticated_as == "reaper"
        assert "s3cret" not in repr(sender)


async def test_wrong_smtp_password_is_a_temporary_failure(tls_files: TlsFiles) -> None:
    with SmtpSink(tls=tls_files, require_starttls=True, users={"reaper": "s3cret"}) as sink:
        sender = EmailSender(sink.host, sink.port, username="reaper", password="wrong",
                             from_addr=FROM, cert_bundle=tls_files.cert, timeout=5)
        with pytest.raises(DeliveryError) as e:
            await sender.send("alice@example.org", render(NoticeKind.WARNING, sample_context()))
        assert e.value.permanent is False and "535" in str(e.value)
        assert "wrong" not in str(e.value)
        assert sink.messages == []


async def test_untrusted_certificate_is_refused_and_temporary(tls_files: TlsFiles) -> None:
    with SmtpSink(tls=tls_files, require_starttls=True) as sink:
        sender = EmailSender(sink.host, sink.port, security="starttls", from_addr=FROM, timeout=5)
        with pytest.raises(DeliveryError) as e:
            await sender.send("alice@example.org", render(NoticeKind.WARNING, sample_context()))
        assert e.value.permanent is False and "CERTIFICATE_VERIFY_FAILED" in str(e.value)
        assert sink.messages == []


async def test_server_without_starttls_is_not_used_in_clear_when_starttls_is_configured(sink: SmtpSink) -> None:
    sender = EmailSender(sink.host, sink.port, security="starttls", from_addr=FROM, timeout=5)
    with pytest.raises(DeliveryError) as e:
        await sender.send("alice@example.org", render(NoticeKind.WARNING, sample_context()))
    assert e.value.permanent is False
    assert sink.messages == []


async def test_implicit_tls_delivers(tls_files: TlsFiles) -> None:
    import ssl

    from aiosmtpd.controller import Controller

    from .smtp_sink import _Handler

    handler = _Handler(users={})
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls_files.cert, tls_files.key)
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, ssl_context=ctx, ready_timeout=10)
    controller.start()
    try:
        sender = EmailSender("127.0.0.1", port, security="tls", from_addr=FROM, cert_bundle=tls_files.cert,
                             timeout=5)
        await sender.send("alice@example.org", render(NoticeKind.FINAL, sample_context()))
        assert len(handler.messages) == 1 and handler.messages[0].tls is True
    finally:
        controller.stop()


async def test_550_for_the_recipient_is_permanent(sink: SmtpSink) -> None:
    sink.reject_address("nobody@example.org", "550 5.1.1 No such user here")
    with pytest.raises(DeliveryError) as e:
        await plain_sender(sink).send("nobody@example.org", render(NoticeKind.WARNING, sample_context()))
    assert e.value.permanent is True and "550" in str(e.value)
    assert sink.messages == []


async def test_550_for_the_message_data_is_permanent(sink: SmtpSink) -> None:
    sink.fail_next("554 5.7.1 Message rejected as spam", stage="data")
    with pytest.raises(DeliveryError) as e:
        await plain_sender(sink).send("alice@example.org", render(NoticeKind.WARNING, sample_context()))
    assert e.value.permanent is True and "554" in str(e.value)


async def test_451_is_temporary_and_the_retry_delivers_exactly_once(sink: SmtpSink) -> None:
    sink.fail_next("451 4.3.0 Local error, try again later", stage="rcpt")
    sender = plain_sender(sink)
    rendered = render(NoticeKind.WARNING, sample_context())
    with pytest.raises(DeliveryError) as e:
        await sender.send("alice@example.org", rendered)
    assert e.value.permanent is False and "451" in str(e.value)
    assert sink.messages == []
    await sender.send("alice@example.org", rendered)
    assert len(sink.messages) == 1


async def test_user_refused_but_admin_copy_accepted_is_still_a_failure_for_the_user(sink: SmtpSink) -> None:
    sink.reject_address("gone@example.org")
    with pytest.raises(DeliveryError) as e:
        await plain_sender(sink).send("gone@example.org", render(NoticeKind.STOPPED, sample_context()),
                                      cc="admins@hub.example.org")
    assert e.value.permanent is True and "gone@example.org" in str(e.value)


async def test_refused_connection_is_temporary_and_delivery_works_once_smtp_is_back() -> None:
    sink = SmtpSink()  # not started yet: nothing listens on its port
    sender = plain_sender(sink)
    rendered = render(NoticeKind.FINAL, sample_context())
    with pytest.raises(DeliveryError) as e:
        await sender.send("alice@example.org", rendered)
    assert e.value.permanent is False
    with sink:
        await sender.send("alice@example.org", rendered)
        assert len(sink.messages) == 1
    # down again after it worked: still temporary, nothing more delivered
    with pytest.raises(DeliveryError) as e2:
        await sender.send("alice@example.org", rendered)
    assert e2.value.permanent is False
    assert len(sink.messages) == 1


async def test_a_server_that_never_answers_times_out_as_temporary() -> None:
    with socket.socket() as listener:  # accepts the TCP connection, never sends the SMTP banner
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sender = EmailSender("127.0.0.1", listener.getsockname()[1], security="none", from_addr=FROM,
                             timeout=0.5)
        with pytest.raises(DeliveryError) as e:
            await sender.send("alice@example.org", render(NoticeKind.WARNING, sample_context()))
    assert e.value.permanent is False


@pytest.mark.parametrize("bad", ["", "alice", "alice@", "a b@example.org", "x@y.org\nBcc: evil@x.org",
                                 "Alice <alice@example.org>"])
async def test_invalid_recipient_is_permanent_without_connecting(sink: SmtpSink, bad: str) -> None:
    with pytest.raises(DeliveryError) as e:
        await plain_sender(sink).send(bad, render(NoticeKind.WARNING, sample_context()))
    assert e.value.permanent is True
    assert sink.commands == []


async def test_hostile_server_name_cannot_inject_headers(sink: SmtpSink) -> None:
    ctx = TemplateContext(**{**sample_context().__dict__, "server_name": "x\r\nBcc: evil@example.org",
                           "server_label": ""})
    await plain_sender(sink).send("alice@example.org", render(NoticeKind.WARNING, ctx))
    [got] = sink.messages
    assert got.rcpt_tos == ["alice@example.org"]
    assert got.message["Bcc"] is None
    assert "\n" not in str(got.message["Subject"])


def test_resolve_address_prefers_mapping_then_auth_state_then_template() -> None:
    tpl = "{username}@mila.quebec"
    assert resolve_address("alice", template=tpl, mapping={"alice": "a.smith@uni.edu"},
                           auth_state={"email": "alice@idp.org"}) == "a.smith@uni.edu"
    assert resolve_address("alice", template=tpl, mapping={"bob": "b@uni.edu"},
                           auth_state={"email": "alice@idp.org"}) == "alice@idp.org"
    assert resolve_address("alice", template=tpl, auth_state={"mail": "x@idp.org"},
                           auth_state_key="mail") == "x@idp.org"
    assert resolve_address("alice", template=tpl, mapping=None, auth_state=None) == "alice@mila.quebec"


def test_resolve_address_skips_invalid_sources_and_returns_none_when_nothing_is_valid() -> None:
    assert resolve_address("alice", template="{username}@mila.quebec", mapping={"alice": "not an address"},
                           auth_state={"email": "also bad"}) == "alice@mila.quebec"
    assert resolve_address("al ice", template="{username}@mila.quebec") is None
    assert resolve_address("alice", template="") is None
    assert resolve_address("alice", template="{user}@broken") is None


def test_valid_address() -> None:
    assert valid_address("alice@mila.quebec")
    assert not valid_address("alice@localhost")
    assert not valid_address("alice@@x.org")
    assert not valid_address("<alice@x.org>")


def test_sender_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError):
        EmailSender("h", 25, security="ssl", from_addr=FROM)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        EmailSender("h", 25, from_addr="not-an-address")


def test_tls_files_are_real_pem(tls_files: TlsFiles) -> None:
    assert Path(tls_files.cert).read_text().startswith("-----BEGIN CERTIFICATE-----")
