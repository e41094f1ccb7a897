"""The page's login: JupyterHub's HubOAuth (reaper.web.auth configures it), over real HTTP to the
running page, the page asking the hub over HTTP too (tests/web HubAPI: FakeHub's ``identities``
and its code trade as the hub answers them).

``web.hub.grant`` is the hub's authorize step (a one-time code bound to the client, the redirect
URI and the PKCE challenge). The browser is httpx with cookies by hand. The same flow against the
real hub, in chromium: tests/integration/test_browser.py."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from tornado.web import create_signed_value

from reaper.web.auth import access_scopes, hub_home, hub_oauth
from tests.web import (  # noqa: F401 (fixtures)
    CLIENT_ID,
    HUB,
    PREFIX,
    SECRET,
    SERVICE_TOKEN,
    Service,
    Web,
    make_web,
    settings,
    web,
)


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
    [(name, _)] = state_cookies.items()
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
    # the code was traded once, with our API token as the client secret and the PKCE verifier
    [form] = web.hub.token_forms
    assert form["client_secret"] == SERVICE_TOKEN and len(form["code_verifier"]) >= 43
    assert web.hub.codes == {}

    page = await Browser(web).get(web.url(), headers=header({CLIENT_ID: jar(r)[CLIENT_ID]}))
    assert page.status_code == 200 and "alice" in page.text


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
    forged = await callback(web, {"code": code, "state": state}, {name: state})
    assert forged.status_code == 403 and CLIENT_ID not in jar(forged)
    # the right cookie name, signed with the page's secret, with another state in it
    other = {name: create_signed_value(SECRET, name, "another").decode()}
    assert (await callback(web, {"code": code, "state": state}, other)).status_code == 403
    assert web.hub.token_forms == []  # none of these reached the hub
    # then the right one works; the code is good once (the hub refuses it again)
    ok = await callback(web, {"code": code, "state": state}, mine)
    assert ok.status_code == 302 and CLIENT_ID in jar(ok)
    again = await callback(web, {"code": code, "state": state}, mine)
    assert again.status_code >= 400 and CLIENT_ID not in jar(again)


async def test_a_service_token_is_not_the_user_of_the_same_name(make_web):
    web = await make_web()
    web.hub.identities["tok-svc"] = {"kind": "service", "name": "alice", "scopes": ["access:services"]}
    api = {"Authorization": "token tok-svc", "Accept": "application/json"}
    assert (await Browser(web).get(web.url("api/servers"), headers=api)).status_code == 403
    r = await Browser(web).post(web.url("stop"), data={"user": "alice", "server": ""}, headers=api)
    assert r.status_code == 403 and web.hub.stops == []
    # nor logged in through the browser
    assert (await log_in(web, "tok-svc")).status_code == 302  # the hub's code trade succeeds...
    r = await Browser(web).get(web.url(), headers={"Cookie": web.cookie_header("svc")["Cookie"]})
    assert r.status_code == 403  # ...but the page refuses a service


async def test_a_user_without_this_services_access_scope_is_refused(web):
    assert (await web.get("", "dave")).status_code == 403
    assert (await web.get("api/servers", "dave")).status_code == 403
    api = {"Authorization": "token tok-dave", "Accept": "application/json"}
    r = await Browser(web).post(web.url("stop"), data={"user": "dave", "server": ""}, headers=api)
    assert r.status_code == 403
    # the unfiltered scope covers the filtered one (root holds access:services)
    assert (await web.get("api/servers", "root")).status_code == 200


async def test_a_user_cannot_act_on_another_users_server_with_their_own_login(web):
    api = {"Authorization": "token tok-bob", "Accept": "application/json"}
    assert (await Browser(web).get(web.url("api/servers/alice/"), headers=api)).status_code == 403
    r = await Browser(web).post(web.url("stop"), data={"user": "alice", "server": ""}, headers=api)
    assert r.status_code == 403 and web.hub.stops == []
    r = await web.post("stop", "bob", {"user": "alice", "server": ""})
    assert r.status_code == 403 and web.hub.stops == []


async def test_a_scripts_read_with_the_cookie_needs_the_xsrf_token(web):
    # what a user server's page on the same origin could do: fetch() the page with an admin's cookie
    scripted = {**web.cookie_header("root"), "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin"}
    assert (await Browser(web).get(web.url("api/servers"), headers=scripted)).status_code == 403
    embedded = {**web.cookie_header("root"), "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Site": "cross-site"}
    assert (await Browser(web).get(web.url("api/servers"), headers=embedded)).status_code == 403
    xsrf = await web.xsrf("root")
    ok = await Browser(web).get(web.url("api/servers"), headers={**web.cookie_header("root"), "X-XSRFToken": xsrf,
                                                                 "Sec-Fetch-Mode": "cors"})
    assert ok.status_code == 200
    navigate = {**web.cookie_header("root"), "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Site": "none"}
    assert (await Browser(web).get(web.url(), headers=navigate)).status_code == 200


async def test_xsrf_tokens_on_post_are_bound_to_the_login_and_the_hub_session(web):
    alices = await web.xsrf("alice")
    # no token at all
    r = await Browser(web).post(web.url("stop"), data={"user": "alice", "server": ""}, headers=web.cookie_header("alice"))
    assert r.status_code == 403 and web.hub.stops == []
    # a tossed _xsrf cookie equal to the form field (what a user server on the domain could set)
    tossed = {"Cookie": web.cookie_header("alice")["Cookie"] + "; _xsrf=aaaa"}
    r = await Browser(web).post(web.url("stop"), data={"user": "alice", "server": "", "_xsrf": "aaaa"}, headers=tossed)
    assert r.status_code == 403 and web.hub.stops == []
    # bob's token in alice's form
    r = await Browser(web).post(web.url("stop"), data={"user": "bob", "server": "", "_xsrf": alices},
                              headers=web.cookie_header("bob"))
    assert r.status_code == 403 and web.hub.stops == []
    # alice's token from another hub session (she logged out and in again) no longer works
    other = {"Cookie": web.cookie_header("alice")["Cookie"] + "; jupyterhub-session-id=new"}
    r = await Browser(web).post(web.url("stop"), data={"user": "alice", "server": "", "_xsrf": alices}, headers=other)
    assert r.status_code == 403 and web.hub.stops == []
    # a made-up token in the Authorization header beside the cookie does not skip the check
    r = await Browser(web).post(web.url("stop"), data={"user": "alice", "server": ""},
                              headers={**web.cookie_header("alice"), "Authorization": "token nope"})
    assert r.status_code == 403 and web.hub.stops == []
    # in a header, as scripts send it
    r = await Browser(web).post(web.url("stop"), data={"user": "alice", "server": ""},
                              headers={**web.cookie_header("alice"), "X-XSRFToken": alices})
    assert r.status_code in (200, 302, 303) and web.hub.stops == [("alice", "")]


async def test_api_clients_use_the_authorization_header_without_xsrf(web):
    api = {"Authorization": "token tok-alice", "Accept": "application/json"}
    r = await Browser(web).get(web.url("api/servers"), headers=api)
    assert r.status_code == 200 and [s["user"] for s in r.json()["servers"]] == ["alice"]
    r = await Browser(web).post(web.url("stop"), data={"user": "alice", "server": ""}, headers=api)
    assert r.status_code in (200, 302, 303) and web.hub.stops == [("alice", "")]
    r = await Browser(web).get(web.url("api/servers"), headers={"Authorization": "token nope"})
    assert r.status_code == 403


async def test_a_token_the_hub_forgot_clears_the_cookie_and_sends_to_the_login(web):
    del web.hub.identities["tok-alice"]  # the user logged out of the hub: the hub revoked it
    r = await web.get("", "alice")
    assert r.status_code == 302 and r.headers["location"].startswith("/hub/api/oauth2/authorize")
    assert cookies_set(r)[CLIENT_ID].startswith(f'{CLIENT_ID}=""; expires=')  # cleared


async def test_the_hubs_answer_is_reused(web):
    for _ in range(3):
        assert (await web.get("api/servers", "alice")).status_code == 200
    assert web.hub.identify_calls == ["tok-alice"]
    # a different hub session is a different entry
    r = await Browser(web).get(web.url("api/servers"),
                             headers={"Cookie": web.cookie_header("alice")["Cookie"] + "; jupyterhub-session-id=s2"})
    assert r.status_code == 200 and web.hub.identify_calls == ["tok-alice", "tok-alice"]


async def test_a_hub_that_does_not_answer_is_an_error_not_a_logout(web):
    web.hub.hub_down = True
    r = await web.get("", "alice")
    assert r.status_code == 502
    assert CLIENT_ID not in cookies_set(r)  # the cookie is kept


async def test_forged_login_cookie_is_nobody(web):
    forged = create_signed_value(b"y" * 32, CLIENT_ID, "tok-alice").decode()
    r = await Browser(web).get(web.url("api/servers"), headers={"Cookie": f"{CLIENT_ID}={forged}"})
    assert r.status_code == 403 and web.hub.identify_calls == []
    plain = await Browser(web).get(web.url("api/servers"), headers={"Cookie": f"{CLIENT_ID}=tok-alice"})
    assert plain.status_code == 403


async def test_behind_https_the_cookies_are_secure(web):
    r = await Browser(web).get(web.url(), headers={"X-Forwarded-Proto": "https"})
    assert all("Secure" in line for line in cookies_set(r).values())
    q = parse_qs(urlparse(r.headers["location"]).query)
    code = web.hub.grant("tok-alice", **{k: v[0] for k, v in q.items()})
    r = await Browser(web).get(web.url("oauth_callback"), params={"code": code, "state": q["state"][0]},
                             headers={**header(jar(r)), "X-Forwarded-Proto": "https"})
    assert r.status_code == 302 and "Secure" in cookies_set(r)[CLIENT_ID]


def test_configured_from_the_hubs_environment():
    env = {"JUPYTERHUB_CLIENT_ID": "service-reaper", "JUPYTERHUB_SERVICE_NAME": "reaper",
           "JUPYTERHUB_BASE_URL": "/jh/", "JUPYTERHUB_HOST": "",
           "JUPYTERHUB_OAUTH_CALLBACK_URL": "/jh/services/reaper/oauth_callback",
           "JUPYTERHUB_OAUTH_ACCESS_SCOPES": '["access:services!service=reaper", "access:services"]',
           "JUPYTERHUB_COOKIE_OPTIONS": '{"samesite": "Strict"}'}
    auth = hub_oauth(api_url="http://127.0.0.1:1/jh/hub/api/", api_token="t", prefix="/jh/services/reaper", env=env)
    assert auth.oauth_authorization_url == "/jh/hub/api/oauth2/authorize"
    assert auth.oauth_token_url == "http://127.0.0.1:1/jh/hub/api/oauth2/token"
    assert auth.oauth_redirect_uri == "/jh/services/reaper/oauth_callback"
    assert auth.access_scopes == {"access:services!service=reaper", "access:services"}
    assert auth.cookie_options == {"samesite": "Strict"} and auth.base_url == "/jh/services/reaper/"
    assert auth.cookie_name == "service-reaper" and hub_home(env) == "/jh/hub/home"
    bare = hub_oauth(api_url="http://h/hub/api", api_token="t", prefix="/services/reaper/",
                     env={"JUPYTERHUB_SERVICE_NAME": "reaper"})
    assert bare.oauth_client_id == "service-reaper" and bare.access_scopes == {"access:services!service=reaper"}
    assert bare.oauth_redirect_uri == "/services/reaper/oauth_callback"
    # no scope named by the hub: still one to require (fails closed), never "every hub user"
    assert access_scopes({}) == {"access:services!service=reaper"}
    assert access_scopes({"JUPYTERHUB_OAUTH_ACCESS_SCOPES": "[]"}) == {"access:services!service=reaper"}
    with pytest.raises(ValueError, match="token"):
        hub_oauth(api_url="http://h/hub/api", api_token=None, prefix="/", env={})


def test_the_page_does_not_use_the_sweeps_hub_client_for_its_login(monkeypatch):
    # the page's login asks the hub at hub.api_url through JupyterHub's own client: the service's
    # hub client (its pools, its slots) is not even looked at
    from reaper.web.app import make_app

    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "svc")
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://127.0.0.1:9/hub/api")
    app = make_app(Service(settings=settings(), store=None, hub=None, sweeper=None))
    auth = app.settings["reaper_ctx"].hub_auth
    assert auth.api_url == "http://127.0.0.1:9/hub/api" and auth.api_token == "svc"


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
    server = HTTPServer(make_app(web.service, prefix=PREFIX, hub_auth=web.hub_auth))
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
