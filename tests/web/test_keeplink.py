# ruff: noqa: F811  (pytest fixtures imported from tests.web are parameters here)
"""The notices' one-click keep link: a real tornado server, real SQLite store and Sweeper, no hub
login at all (no cookie is sent in any request here). GET never acts; one POST keeps the server
as the page's Keep button does and records it; tampered, expired and reused links are refused
with a readable page and change nothing; the POST needs no xsrf cookie (the signature is its
authority)."""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

from reaper.notify.keeplinks import KeepLink, link_id, sign
from tests.web import hub_server, make_web, utcnow, web  # noqa: F401  (fixtures)


def secret(w) -> bytes:
    return w.store.keeplinks.secret()


def link_for(w, user: str = "alice", server: str = "", *, expires=None, started=None, notice: int = 1) -> str:
    s = w.hub.servers[(user, server)]
    return sign(secret(w), KeepLink(user=user, server=server, started=started or s.started, notice=notice,
                                    expires=expires or utcnow() + timedelta(hours=1)))


def kept(w, user: str = "alice", server: str = ""):
    k = w.hub.servers[(user, server)].run_key()
    return w.store.runs.histories([k])[k].kept_until


def keeps(w) -> list:
    return [a for a in w.store.reports.recent_actions(utcnow() - timedelta(hours=1)) if a.kind == "keep"]


async def get(w, token: str):
    return await w.client.get(w.url("keep-link"), params={"t": token})


async def press(w, token: str):
    return await w.client.post(w.url("keep-link"), data={"t": token})


def nothing_changed(w, user: str = "alice") -> None:
    assert kept(w, user) is None
    assert keeps(w) == []


async def test_opening_the_link_shows_one_button_and_changes_nothing(web):
    token = link_for(web)
    for _ in range(3):  # a mail scanner, a link preview, the user
        r = await get(web, token)
        assert r.status_code == 200
        assert "Keep running for 2h" in r.text and 'method="post"' in r.text
        assert f'name="t" value="{token}"' in r.text
    nothing_changed(web)
    assert web.store.keeplinks.used_at(link_id(token)) is None


async def test_one_press_moves_the_scheduled_stop_and_records_the_keep_without_any_login(web):
    token = link_for(web)
    before = utcnow()
    r = await press(web, token)
    assert r.status_code == 200, r.text
    assert 'data-result="kept"' in r.text and "keeps running until" in r.text
    until = kept(web)
    assert until is not None and before + timedelta(hours=2) - timedelta(seconds=5) <= until <= utcnow() + timedelta(hours=2)
    [act] = keeps(web)
    assert (act.user, act.ok, act.actor) == ("alice", True, "alice (keep link)")
    assert "2h asked by alice (keep link)" in act.detail
    assert kept(web, "bob") is None  # only the link's server


async def test_a_reused_link_is_refused_with_a_page_and_changes_nothing_more(web):
    token = link_for(web)
    assert (await press(web, token)).status_code == 200
    first = kept(web)
    for r in (await press(web, token), await get(web, token)):
        assert r.status_code == 410
        assert "already used" in r.text and "Nothing was changed" in r.text
    assert kept(web) == first and len(keeps(web)) == 1


async def test_a_tampered_link_is_refused_with_a_page_and_changes_nothing(web):
    token = link_for(web)
    body, mac = token.split(".")
    bob = link_for(web, "bob")
    forged = [
        bob.split(".")[0] + "." + mac,  # another payload under alice's signature
        body + "." + ("A" if mac[0] != "A" else "B") + mac[1:],  # a changed signature
        body[:-2] + "." + mac,  # a cut payload
        sign(b"another secret" * 3, KeepLink("alice", "", web.hub.servers[("alice", "")].started, 1,
                                             utcnow() + timedelta(hours=1))),
        "not-a-token", "",
    ]
    for t in forged:
        for r in (await get(web, t), await press(web, t)):
            assert r.status_code == 403, (t, r.status_code)
            assert "This link does not work" in r.text and "Nothing was changed" in r.text
    nothing_changed(web)
    nothing_changed(web, "bob")


async def test_an_expired_link_is_refused_with_a_page_and_changes_nothing(web):
    token = link_for(web, expires=utcnow() - timedelta(seconds=1))
    for r in (await get(web, token), await press(web, token)):
        assert r.status_code == 410
        assert "expired" in r.text and "Nothing was changed" in r.text
    nothing_changed(web)


async def test_a_link_of_an_earlier_run_of_the_server_keeps_nothing_and_stays_unused(web):
    old = web.hub.servers[("alice", "")].started - timedelta(days=1)
    token = link_for(web, started=old)
    r = await press(web, token)
    assert r.status_code == 410 and "has ended" in r.text
    nothing_changed(web)
    assert web.store.keeplinks.used_at(link_id(token)) is None  # the claim was let go


async def test_a_keep_the_policy_refuses_is_shown_and_the_link_is_not_used_up(make_web):
    w = await make_web("web: {keep: {max_per_day: 0}}\n")
    token = link_for(w)
    r = await press(w, token)
    assert r.status_code == 409 and "Cannot keep it running longer" in r.text
    nothing_changed(w)
    assert w.store.keeplinks.used_at(link_id(token)) is None


async def test_the_post_needs_no_xsrf_cookie_but_the_pages_own_keep_still_does(web):
    """The link's POST carries no cookie and no _xsrf field: the signature is its authority. The
    page's own Keep (cookie login) is still refused without the xsrf token."""
    r = await web.post("keep", "alice", {"user": "alice", "server": "", "duration": "2h"}, xsrf=False)
    assert r.status_code == 403
    assert kept(web) is None
    r = await web.client.post(web.url("keep-link"), data={"t": link_for(web)}, headers={"Cookie": ""})
    assert r.status_code == 200 and kept(web) is not None


async def test_the_page_is_not_framed_cached_or_leaking_the_token_by_referer(web):
    r = await get(web, link_for(web))
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["Referrer-Policy"] == "no-referrer"
    assert "form-action 'self'" in r.headers["Content-Security-Policy"]


async def test_the_link_a_notice_carries_opens_this_page_for_its_run(web):
    """The delivered notice's keep link (reaper/notify/channels.py) is the signed one: opening it
    shows the confirm page, pressing keeps the server."""
    from reaper.core.model import NoticeKind
    from reaper.notify.channels import render_delivery
    from reaper.store import NoticeContext

    s = web.hub.servers[("alice", "")]
    key = s.run_key()
    stop = utcnow() + timedelta(minutes=40)
    web.store.outbox.add_notice(key, NoticeKind.FINAL, s.started, utcnow(), channels=["log"],
                                context=NoticeContext(user="alice", server="", started=s.started, stop_at=stop))
    [d] = [d for d in web.store.outbox.due_deliveries(utcnow() + timedelta(seconds=1)) if d.kind is NoticeKind.FINAL]
    r = render_delivery(d, web.service.settings, utcnow(), secret=secret(web))
    m = re.search(r"(https?://\S+/keep-link\?t=\S+)", r.text)
    assert m, r.text
    token = parse_qs(urlsplit(m.group(1)).query)["t"][0]
    page = await get(web, token)
    assert page.status_code == 200 and "Keep running for 2h" in page.text
    assert (await press(web, token)).status_code == 200
    assert kept(web) is not None
