"""The page's login (reaper.web.login): the hub's OAuth flow, over real HTTP to the running page.

The hub is tests/fakes.py's FakeHub: ``grant`` is its authorize step (a one-time code bound to the
client, the redirect URI and the PKCE challenge), ``oauth_token`` checks a code as the hub's token
endpoint does, ``identities`` answer GET /hub/api/user. The browser is httpx with cookies by hand.
The same flow against the real hub, in chromium: tests/integration/test_browser.py."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from tornado.web import create_signed_value

from reaper.web.login import HubLogin, _trim, pkce_pair, scope_allows
from tests.web import CLIENT_ID, HUB, PREFIX, SECRET, Web, make_web, web  # noqa: F401 (fixtures)


def cookies_set(r: httpx.Response) -> dict[str, str]:
    """name -> the whole Set-Cookie line, for each cookie the answer sets (or clears)."""
    return {line.split("=", 1)[0]: line for line in r.headers.get_list("set-cookie")}


def jar(r: httpx.Response) -> dict[str, str]:
    return {name: line.split("=", 1)[1].split(";", 1)[0] for name, line in cookies_set(r).items()}


class Browser:
    """web.client without its cookie jar: each request carries exactly the cookies given."""

    def __init__(self, web: Web) -> None:
        self.client = web.client

    async def get(self, url: str, **kw):
        self.client.cookies.clear()
        return await self.client.get(url, **kw)

    async def post(self, url: str, **kw):
        self.client.cookies.clear()
        return await self.client.post(url, **kw)


def header(cookies: dict[str, str]) -> dict[str, str]:
    return {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())}


async def start_login(web: Web, path: str = "") -> tuple[dict[str, list[str]], dict[str, str]]:
    """A visitor without a login opens ``path``: the authorize URL's query and the state cookie."""
    r = await Browser(web).get(web.url(path))
    assert r.status_code == 302, r.text
    loc = urlparse(r.headers["location"])
    assert loc.path == "/hub/api/oauth2/authorize"
    return parse_qs(loc.query), jar(r)


async def callback(web: Web, query: dict[str, str], cookies: dict[str, str]) -> httpx.Response:
    return await Browser(web).get(web.url("oauth_callback"), params=query, headers=header(cookies))


async def log_in(web: Web, token: str, path: str = "") -> httpx.Response:
    q, state_cookies = await start_login(web, path)
    code = web.hub.grant(token, **{k: v[0] for k, v in q.items()})
    return await callback(web, {"code": code, "state": q["state"][0]}, state_cookies)


async def test_the_whole_flow_brings_the_visitor_back_to_the_page_they_asked_for(web):
    q, state_cookies = await start_login(web, "?dry_run=1")
    assert q["client_id"] == [CLIENT_ID] and q["response_type"] == ["code"]
    assert q["redirect_uri"] == [f"{HUB}{PREFIX}oauth_callback"]
    assert q["code_challenge_method"] == ["S256"] and len(q["code_challenge"][0]) == 43
    assert len(q["state"][0]) >= 22
    [(name, value)] = state_cookies.items()
    assert name.startswith(f"{CLIENT_ID}-oauth-state")
    line = next(iter(cookies_set(await Browser(web).get(web.url("?dry_run=1"))).values()))
    assert "HttpOnly" in line and f"Path={PREFIX}" in line and "Max-Age=600" in line

    code = web.hub.grant("tok-alice", **{k: v[0] for k, v in q.items()})
    r = await callback(web, {"code": code, "state": q["state"][0]}, state_cookies)
    assert r.status_code == 302 and r.headers["location"] == f"{PREFIX}?dry_run=1"
    set_ = cookies_set(r)
    assert "HttpOnly" in set_[CLIENT_ID] and f"Path={PREFIX}" in set_[CLIENT_ID]
    assert "Secure" not in set_[CLIENT_ID]  # plain http here; https below
    assert set_[name].startswith(f'{name}=""; expires=')  # the state cookie is cleared
    assert "tok-alice" not in r.headers.get("location", "")

    page = await Browser(web).get(web.url(), headers=header({CLIENT_ID: jar(r)[CLIENT_ID]}))
    assert page.status_code == 200 and "alice" in page.text
    assert web.hub.codes == {}  # the code was used up


async def test_the_state_must_be_this_browsers(web):
    q, mine = await start_login(web)
    _, theirs = await start_login(web)
    code = web.hub.grant("tok-alice", **{k: v[0] for k, v in q.items()})
    state = q["state"][0]
    # another browser's state cookie, no cookie, no state, no code
    assert (await callback(web, {"code": code, "state": state}, theirs)).status_code == 403
    assert (await callback(web, {"code": code, "state": state}, {})).status_code == 403
    assert (await callback(web, {"code": code}, mine)).status_code == 400
    assert (await callback(web, {"state": state}, mine)).status_code == 400
    # a forged state cookie (not signed with the page's secret)
    name = next(iter(mine))
    forged = {name: state}
    assert (await callback(web, {"code": code, "state": state}, forged)).status_code == 403
    assert CLIENT_ID not in jar(await callback(web, {"code": code, "state": state}, forged))
    # the right cookie name, signed with the page's secret, with another state in it
    other = {name: create_signed_value(SECRET, name, '{"s": "another", "v": "x", "n": "/", "e": 1e12}').decode()}
    assert (await callback(web, {"code": code, "state": state}, other)).status_code == 403
    # then the right one works; the code is good once (the hub refuses it again)
    ok = await callback(web, {"code": code, "state": state}, mine)
    assert ok.status_code == 302 and CLIENT_ID in jar(ok)
    again = await callback(web, {"code": code, "state": state}, mine)
    assert again.status_code == 502 and CLIENT_ID not in jar(again)


async def test_the_hubs_refusal_is_said_plainly_and_only_to_the_browser_that_asked(web):
    q, mine = await start_login(web)
    state = q["state"][0]
    r = await callback(web, {"state": state, "error": "access_denied", "error_description": "<b>call 555</b>"}, mine)
    assert r.status_code == 400 and "access_denied" in r.text and "call 555" not in r.text
    r = await callback(web, {"state": state, "error": "made-up <i>", "error_description": "x"}, mine)
    assert r.status_code == 400 and "made-up" not in r.text
    # a crafted link without this browser's login shows nothing of its text
    r = await callback(web, {"state": "x", "error": "access_denied", "error_description": "call 555"}, {})
    assert r.status_code == 403 and "call 555" not in r.text


async def test_no_flood_of_visitors_pushes_a_login_under_way_out(web):
    q, mine = await start_login(web)
    for _ in range(300):  # anonymous visits: each starts a login of its own, kept in its own browser
        assert (await Browser(web).get(web.url())).status_code == 302
    code = web.hub.grant("tok-alice", **{k: v[0] for k, v in q.items()})
    r = await callback(web, {"code": code, "state": q["state"][0]}, mine)
    assert r.status_code == 302 and CLIENT_ID in jar(r)
    assert not hasattr(web.login, "_pending")  # nothing kept in the service per visitor


async def test_a_stale_callback_of_someone_logged_in_just_goes_back_without_a_new_token(web):
    r = await log_in(web, "tok-alice", "?x=1")
    login = jar(r)
    q, _ = await start_login(web)
    code = web.hub.grant("tok-bob", **{k: v[0] for k, v in q.items()})
    again = await callback(web, {"code": code, "state": q["state"][0]}, login)  # the state cookie is gone
    assert again.status_code == 302 and again.headers["location"] == PREFIX
    assert CLIENT_ID not in jar(again) and code in web.hub.codes  # no trade, no new login


async def test_a_service_token_is_not_the_user_of_the_same_name(make_web):
    web = await make_web()
    web.hub.identities["tok-svc"] = {"kind": "service", "name": "alice", "scopes": ["access:services"]}
    api = {"Authorization": "token tok-svc", "Accept": "application/json"}
    assert (await Browser(web).get(web.url("api/servers"), headers=api)).status_code == 403
    r = await Browser(web).post(web.url("stop"), data={"user": "alice", "server": ""}, headers=api)
    assert r.status_code == 403 and web.hub.stops == []


async def test_a_scripts_read_with_the_cookie_needs_the_xsrf_token(web):
    # what a user server's page on the same origin could do: fetch() the page with an admin's cookie
    scripted = {**web.cookie_header("root"), "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin"}
    assert (await Browser(web).get(web.url("api/servers"), headers=scripted)).status_code == 403
    embedded = {**web.cookie_header("root"), "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Site": "cross-site"}
    assert (await Browser(web).get(web.url("api/servers"), headers=embedded)).status_code == 403
    xsrf = await web.xsrf("root")
    ok = await Browser(web).get(web.url("api/servers"), headers={**scripted, "X-XSRFToken": xsrf})
    assert ok.status_code == 200
    navigate = {**web.cookie_header("root"), "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Site": "none"}
    assert (await Browser(web).get(web.url(), headers=navigate)).status_code == 200


async def test_cookies_set_for_a_domain_are_cleared_for_it(make_web):
    web = await make_web()
    web.login.cookie_options = {"domain": "hub.example.org"}
    del web.hub.identities["tok-alice"]
    r = await web.get("", "alice")
    assert "Domain=hub.example.org" in cookies_set(r)[CLIENT_ID]


async def test_many_visitors_with_one_token_ask_the_hub_once_and_the_sweeps_slots_are_not_used(make_web):
    import asyncio

    web = await make_web()
    gate = asyncio.Event()
    real = web.hub.identify

    async def slow(token):
        await gate.wait()
        return await real(token)

    web.hub.identify = slow
    pending = [asyncio.ensure_future(web.get("api/servers", "alice")) for _ in range(5)]
    await asyncio.sleep(0.3)
    gate.set()
    assert [r.status_code for r in await asyncio.gather(*pending)] == [200] * 5
    assert web.hub.identify_calls == ["tok-alice"]


async def test_when_the_pages_hub_slots_stay_busy_a_visitor_gets_a_503_not_a_hang(make_web, monkeypatch):
    import asyncio

    from reaper.web import login as login_module

    monkeypatch.setattr(login_module, "HUB_WAIT", 0.2)
    web = await make_web()
    gate = asyncio.Event()

    async def stuck(token):
        await gate.wait()
        return None

    web.hub.identify = stuck
    held = [asyncio.ensure_future(Browser(web).get(web.url("api/servers"), headers={"Authorization": f"token t{i}"}))
            for i in range(login_module.HUB_SLOTS)]
    await asyncio.sleep(0.1)
    r = await Browser(web).get(web.url("api/servers"), headers={"Authorization": "token another"})
    assert r.status_code == 503
    gate.set()
    assert [x.status_code for x in await asyncio.gather(*held)] == [403] * login_module.HUB_SLOTS


async def test_the_pkce_verifier_goes_with_the_code_and_a_refused_trade_logs_no_one_in(web):
    q, state_cookies = await start_login(web)
    challenge = q.pop("code_challenge")[0]
    code = web.hub.grant("tok-alice", code_challenge="x" + challenge[1:], **{k: v[0] for k, v in q.items()})
    r = await callback(web, {"code": code, "state": q["state"][0]}, state_cookies)
    assert r.status_code == 502 and CLIENT_ID not in jar(r)


async def test_a_login_that_took_too_long_is_refused(make_web):
    web = await make_web()
    now = [1000.0]
    web.login.clock = lambda: now[0]
    q, state_cookies = await start_login(web)
    code = web.hub.grant("tok-alice", **{k: v[0] for k, v in q.items()})
    now[0] += 601
    r = await callback(web, {"code": code, "state": q["state"][0]}, state_cookies)
    assert r.status_code == 403 and "too long" in r.text


async def test_a_user_without_this_services_access_scope_is_refused(web):
    r = await log_in(web, "tok-dave")
    assert r.status_code == 403 and CLIENT_ID not in jar(r)
    assert (await web.get("", "dave")).status_code == 403
    assert (await web.get("api/servers", "dave")).status_code == 403
    # the unfiltered scope covers the filtered one (root holds access:services)
    assert (await log_in(web, "tok-root")).status_code == 302


async def test_a_token_the_hub_forgot_clears_the_cookie_and_sends_to_the_login(web):
    del web.hub.identities["tok-alice"]  # the user logged out of the hub: the hub revoked it
    r = await web.get("", "alice")
    assert r.status_code == 302 and r.headers["location"].startswith("/hub/api/oauth2/authorize")
    assert cookies_set(r)[CLIENT_ID].startswith(f'{CLIENT_ID}=""; expires=')  # cleared


async def test_the_hubs_answer_is_kept_a_minute(make_web):
    web = await make_web()
    now = [1000.0]
    web.login.clock = lambda: now[0]
    for _ in range(3):
        assert (await web.get("api/servers", "alice")).status_code == 200
    assert web.hub.identify_calls == ["tok-alice"]
    now[0] += 61
    assert (await web.get("api/servers", "alice")).status_code == 200
    assert web.hub.identify_calls == ["tok-alice", "tok-alice"]
    # a different hub session is a different entry
    await Browser(web).get(web.url("api/servers"), headers={**web.cookie_header("alice"),
                                                           "Cookie": web.cookie_header("alice")["Cookie"]
                                                           + "; jupyterhub-session-id=s2"})
    assert len(web.hub.identify_calls) == 3


async def test_a_hub_that_does_not_answer_is_a_502_not_a_logout(web):
    web.hub.hub_down = True
    r = await web.get("", "alice")
    assert r.status_code == 502 and "did not answer" in r.text
    assert CLIENT_ID not in cookies_set(r)  # the cookie is kept


async def test_api_clients_use_the_authorization_header_without_xsrf_and_without_the_cookie(web):
    api = {"Authorization": "token tok-alice", "Accept": "application/json"}
    r = await Browser(web).get(web.url("api/servers"), headers=api)
    assert r.status_code == 200 and [s["user"] for s in r.json()["servers"]] == ["alice"]
    r = await Browser(web).post(web.url("stop"), data={"user": "alice", "server": ""}, headers=api)
    assert r.status_code in (200, 302, 303) and web.hub.stops == [("alice", "")]
    # a bad header token is nobody, even with a good login cookie beside it (no fallback)
    r = await Browser(web).get(web.url("api/servers"),
                             headers={"Authorization": "Bearer nope", **web.cookie_header("alice")})
    assert r.status_code == 403


async def test_xsrf_tokens_are_bound_to_the_login_and_the_hub_session(web):
    alices = await web.xsrf("alice")
    # a tossed _xsrf cookie equal to the form field (what a user server on the domain could set)
    tossed = {"Cookie": web.cookie_header("alice")["Cookie"] + "; _xsrf=aaaa"}
    r = await Browser(web).post(web.url("stop"), data={"user": "alice", "server": "", "_xsrf": "aaaa"}, headers=tossed)
    assert r.status_code == 403 and web.hub.stops == []
    # alice's token from another hub session (she logged out and in again) no longer works
    other = {"Cookie": web.cookie_header("alice")["Cookie"] + "; jupyterhub-session-id=new"}
    r = await Browser(web).post(web.url("stop"), data={"user": "alice", "server": "", "_xsrf": alices}, headers=other)
    assert r.status_code == 403 and web.hub.stops == []
    # in a header, as scripts send it
    r = await Browser(web).post(web.url("stop"), data={"user": "alice", "server": ""},
                              headers={**web.cookie_header("alice"), "X-XSRFToken": alices})
    assert r.status_code in (200, 302, 303) and web.hub.stops == [("alice", "")]


async def test_the_hubs_cookie_options_apply_to_both_cookies(make_web):
    web = await make_web()
    web.login.cookie_options = {"samesite": "Strict", "max_age": 5, "secure": False}
    r = await Browser(web).get(web.url())
    [state_line] = cookies_set(r).values()
    assert "SameSite=Strict" in state_line and "Max-Age=600" in state_line  # not its lifetime
    q = parse_qs(urlparse(r.headers["location"]).query)
    code = web.hub.grant("tok-alice", **{k: v[0] for k, v in q.items()})
    r = await callback(web, {"code": code, "state": q["state"][0]}, jar(r))
    assert "SameSite=Strict" in cookies_set(r)[CLIENT_ID] and "Max-Age=5" in cookies_set(r)[CLIENT_ID]


async def test_behind_https_the_cookies_are_secure(web):
    r = await Browser(web).get(web.url(), headers={"Forwarded": "for=1.2.3.4;proto=https"})
    assert all("Secure" in line and "SameSite=Lax" in line for line in cookies_set(r).values())
    r = await Browser(web).get(web.url(), headers={"X-Forwarded-Proto": "https"})
    assert all("Secure" in line for line in cookies_set(r).values())
    q = parse_qs(urlparse(r.headers["location"]).query)
    code = web.hub.grant("tok-alice", **{k: v[0] for k, v in q.items()})
    r = await Browser(web).get(web.url("oauth_callback"), params={"code": code, "state": q["state"][0]},
                             headers={**header(jar(r)), "X-Forwarded-Proto": "https"})
    assert r.status_code == 302 and "Secure" in cookies_set(r)[CLIENT_ID]


# --------------------------------------------------------------------------- pure parts


def test_scopes_as_the_hub_checks_them():
    need = {"access:services!service=reaper"}
    assert scope_allows(need, ["access:services!service=reaper"])
    assert scope_allows(need, ["access:services"])
    assert not scope_allows(need, ["access:services!service=other"])
    assert not scope_allows(need, ["access:servers!user=alice", "read:users"])
    assert not scope_allows({"access:services"}, ["access:services!service=reaper"])
    assert not scope_allows(need, [])


def test_pkce_is_rfc_7636_s256():
    import base64
    import hashlib

    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128 and re.fullmatch(r"[A-Za-z0-9_-]+", verifier)
    assert challenge == base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    assert pkce_pair()[0] != verifier


def test_configured_from_the_hubs_environment():
    env = {"JUPYTERHUB_CLIENT_ID": "service-reaper", "JUPYTERHUB_SERVICE_NAME": "reaper",
           "JUPYTERHUB_BASE_URL": "/jh/", "JUPYTERHUB_HOST": "",
           "JUPYTERHUB_OAUTH_CALLBACK_URL": "/jh/services/reaper/oauth_callback",
           "JUPYTERHUB_OAUTH_ACCESS_SCOPES": '["access:services!service=reaper", "access:services"]',
           "JUPYTERHUB_PUBLIC_URL": "https://hub.example.org/jh/",
           "JUPYTERHUB_COOKIE_OPTIONS": '{"samesite": "Strict"}'}
    login = HubLogin.from_environment(object(), "/jh/services/reaper/", env)
    assert login.authorize_url == "/jh/hub/api/oauth2/authorize"
    assert login.redirect_uri == "/jh/services/reaper/oauth_callback"
    assert login.access_scopes == {"access:services!service=reaper", "access:services"}
    assert login.secure and login.cookie_options == {"samesite": "Strict"}
    assert login.cookie_name == "service-reaper" and login.hub_home == "/jh/hub/home"
    bare = HubLogin.from_environment(object(), "/services/reaper/", {"JUPYTERHUB_SERVICE_NAME": "reaper"})
    assert bare.client_id == "service-reaper" and bare.access_scopes == {"access:services!service=reaper"}
    # no environment at all: still a scope to require (fails closed), never "every hub user"
    none = HubLogin.from_environment(object(), "/services/reaper/", {})
    assert none.access_scopes == {"access:services!service=reaper"} and none.client_id == "service-reaper"
    empty = HubLogin.from_environment(object(), "/services/reaper/", {"JUPYTERHUB_OAUTH_ACCESS_SCOPES": "[]"})
    assert empty.access_scopes == {"access:services!service=reaper"}
    assert bare.authorize_url == "/hub/api/oauth2/authorize" and not bare.secure
    assert bare.redirect_uri == "/services/reaper/oauth_callback"
    with pytest.raises(ValueError, match="client id"):
        HubLogin(object(), prefix="/", client_id="", authorize_url="/a", redirect_uri="/b")


def test_the_identity_table_stays_bounded():
    table = {f"k{i}": (100.0 if i % 2 else 5.0, None) for i in range(12)}
    _trim(table, now=10.0, limit=10)  # the six expired go
    assert len(table) == 6 and all(v[0] == 100.0 for v in table.values())
    live = {f"k{i}": (100.0, None) for i in range(12)}
    _trim(live, now=10.0, limit=10)  # all live: the oldest half goes
    assert list(live) == [f"k{i}" for i in range(7, 12)]


async def test_forged_login_cookie_is_nobody(web):
    forged = create_signed_value(b"y" * 32, CLIENT_ID, "tok-alice").decode()
    r = await Browser(web).get(web.url("api/servers"), headers={"Cookie": f"{CLIENT_ID}={forged}"})
    assert r.status_code == 403 and web.hub.identify_calls == []
    plain = await Browser(web).get(web.url("api/servers"), headers={"Cookie": f"{CLIENT_ID}=tok-alice"})
    assert plain.status_code == 403


async def test_the_page_is_not_served_in_plain_http_where_the_hub_expects_tls(web, monkeypatch, caplog):
    # the hub's internal_ssl gives the service an https address: serving plain HTTP there would
    # fail in a way no one reads, so the page says why it is not served (sweeps go on)
    from reaper.web.app import start_web
    from tests.harness.hub import free_ports

    monkeypatch.setenv("JUPYTERHUB_SERVICE_URL", f"https://127.0.0.1:{free_ports(1)[0]}")
    started = await start_web(web.service)
    assert started.url is None and started.server is None
    assert "internal_ssl" in caplog.text


async def test_a_restart_keeps_visitors_logged_in_while_the_api_token_stays(web, monkeypatch):
    from tornado.httpserver import HTTPServer

    from reaper.web.app import make_app, page_secret
    from tests.harness.hub import free_ports

    assert page_secret("tok-1") == page_secret("tok-1") != page_secret("tok-2")
    assert len(page_secret("tok-1")) == 32 and b"tok-1" not in page_secret("tok-1")
    assert page_secret(None) != page_secret(None)  # no token: a random key each start
    # the page made after a restart (same token) reads a login cookie signed before it
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "tok-1")
    server = HTTPServer(make_app(web.service, prefix=PREFIX, login=web.login))
    port = free_ports(1)[0]
    server.listen(port, address="127.0.0.1")
    url = f"http://127.0.0.1:{port}{PREFIX}api/servers"
    try:
        before = create_signed_value(page_secret("tok-1"), CLIENT_ID, "tok-alice").decode()
        assert (await Browser(web).get(url, headers={"Cookie": f"{CLIENT_ID}={before}"})).status_code == 200
        other = create_signed_value(page_secret("tok-2"), CLIENT_ID, "tok-alice").decode()
        assert (await Browser(web).get(url, headers={"Cookie": f"{CLIENT_ID}={other}"})).status_code == 403
    finally:
        server.stop()


async def test_code_trades_take_the_pages_hub_slots_too(make_web, monkeypatch):
    # anyone can start a login and come back with a made-up code: those trades wait for the
    # same slots as the identity checks, and a visitor who waits too long gets a 503
    import asyncio

    from reaper.web import login as login_module

    monkeypatch.setattr(login_module, "HUB_WAIT", 0.2)
    web = await make_web()
    gate = asyncio.Event()

    async def stuck(**kw):
        await gate.wait()
        raise login_module.web.HTTPError(599)

    web.hub.oauth_token = stuck
    logins = [await start_login(web) for _ in range(login_module.HUB_SLOTS + 1)]
    held = [asyncio.ensure_future(callback(web, {"code": "x", "state": q["state"][0]}, c))
            for q, c in logins[:-1]]
    await asyncio.sleep(0.1)
    q, c = logins[-1]
    assert (await callback(web, {"code": "x", "state": q["state"][0]}, c)).status_code == 503
    gate.set()
    await asyncio.gather(*held)
