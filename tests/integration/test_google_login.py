"""Google login as at Mila, in the shipped hub (hub/jupyterhub_config.py, REAPER_HUB_AUTH=google).

No network: the real hub (tests/harness/hub.py RealHub, JupyterHub + configurable-http-proxy)
starts with oauthenticator's GoogleOAuthenticator and its login sends the browser to Google's
authorize URL with our client id, callback and hosted domain (``hd=``); and the shipped
configuration, loaded as JupyterHub loads it, turns Google's answer (the user info, Google's two
network calls replaced) into the hub user name: ``my_username@mila.quebec => my_username``, the
site's username_map, the hosted-domain check and the allow rule."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from tests.harness import require_real_part
from tests.harness.hub import HUB_CONFIG, RealHub, missing_parts

pytestmark = pytest.mark.integration

CLIENT_ID = "1234-abcd.apps.googleusercontent.com"


def google_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    umap = tmp_path / "usernames.json"
    umap.write_text(json.dumps({"jane.doe": "doej"}))
    return {"REAPER_GOOGLE_CLIENT_ID": CLIENT_ID, "REAPER_GOOGLE_CLIENT_SECRET": "not-a-real-secret",
            "REAPER_GOOGLE_HOSTED_DOMAIN": "mila.quebec", "REAPER_HUB_USERNAME_MAP": str(umap), **extra}


def test_the_shipped_hub_sends_its_login_to_google_with_the_client_the_callback_and_the_domain(tmp_path):
    require_real_part(not missing_parts(), f"a real JupyterHub ({', '.join(missing_parts())} missing)")
    hub = RealHub(tmp_path / "hub", auth="google")
    callback = f"{hub.base_url}/hub/oauth_callback"
    hub.extra_env.update(google_env(tmp_path, REAPER_GOOGLE_CALLBACK_URL=callback))
    with hub:
        with httpx.Client(timeout=30, follow_redirects=False) as client:
            login = client.get(f"{hub.base_url}/hub/login")
            assert login.status_code == 200 and "oauth_login" in login.text and "Google" in login.text
            r = client.get(f"{hub.base_url}/hub/oauth_login", params={"next": "/hub/home"})
        assert r.status_code == 302, hub.log_tail(40)
        loc = urlparse(r.headers["location"])
        assert (loc.scheme, loc.netloc, loc.path) == ("https", "accounts.google.com", "/o/oauth2/v2/auth")
        q = parse_qs(loc.query)
        assert q["client_id"] == [CLIENT_ID] and q["redirect_uri"] == [callback]
        assert q["hd"] == ["mila.quebec"] and q["response_type"] == ["code"]
        assert set(q["scope"][0].split()) == {"openid", "email"} and q["state"][0]
        assert "not-a-real-secret" not in r.headers["location"]
        # the users' own REST API still answers: the reaper's service token is not Google's business
        assert hub.api("GET", "users").status_code == 200


# ------------------------------------------------------------------ the configuration, in-process


def load_google_authenticator(tmp_path: Path, monkeypatch, **env: str):
    """GoogleOAuthenticator as the shipped file configures it (JupyterHub's own config loader)."""
    from oauthenticator.google import GoogleOAuthenticator
    from traitlets.config import PyFileConfigLoader

    for k in list(__import__("os").environ):
        if k.startswith(("REAPER_", "OAUTH_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("REAPER_HUB_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("REAPER_HUB_AUTH", "google")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = PyFileConfigLoader(HUB_CONFIG.name, path=str(HUB_CONFIG.parent)).load_config()
    assert cfg.JupyterHub.authenticator_class == "google"
    return GoogleOAuthenticator(config=cfg), cfg


async def google_says(auth, monkeypatch, email: str, hd: str = "mila.quebec", verified: bool = True):
    """The hub's login of whoever Google names (the code trade and the userinfo call, Google's
    network part, replaced; the rest is JupyterHub's get_authenticated_user and oauthenticator's)."""
    async def token_info(handler, params):
        return {"access_token": "ya29.x", "token_type": "Bearer", "id_token": ""}

    async def token_to_user(token_info):
        return {"email": email, "hd": hd, "verified_email": verified, "sub": "1"}

    monkeypatch.setattr(auth, "build_access_tokens_request_params", lambda handler, data=None: {"code": "c"})
    monkeypatch.setattr(auth, "get_token_info", token_info)
    monkeypatch.setattr(auth, "token_to_user", token_to_user)
    return await auth.get_authenticated_user(None, {"code": "c"})


async def test_the_domain_is_stripped_the_map_applies_and_only_the_domain_signs_in(tmp_path, monkeypatch):
    env = google_env(tmp_path, REAPER_HUB_ALLOW="all", REAPER_GOOGLE_CALLBACK_URL="https://hub.example/hub/oauth_callback")
    auth, cfg = load_google_authenticator(tmp_path, monkeypatch, **env)
    assert auth.hosted_domain == ["mila.quebec"] and auth.extra_authorize_params == {"hd": "mila.quebec"}
    assert auth.client_id == CLIENT_ID and auth.oauth_callback_url == "https://hub.example/hub/oauth_callback"
    assert (await google_says(auth, monkeypatch, "My_Username@mila.quebec"))["name"] == "my_username"
    assert (await google_says(auth, monkeypatch, "jane.doe@mila.quebec"))["name"] == "doej"  # the site's map
    # another Workspace, or a gmail account claiming the address, does not sign in
    assert await google_says(auth, monkeypatch, "someone@mila.quebec", hd="elsewhere.org") is None
    assert await google_says(auth, monkeypatch, "someone@mila.quebec", hd="") is None
    # the secret is not handed to the reaper's managed service; the mail domain is
    [reaper] = [s for s in cfg.JupyterHub.services if s["name"] == "reaper"]
    assert "REAPER_GOOGLE_CLIENT_SECRET" not in reaper["environment"]
    assert reaper["environment"]["REAPER_MAIL_DOMAIN"] == "mila.quebec"


async def test_by_default_only_users_the_hub_knows_or_lists_get_in(tmp_path, monkeypatch):
    auth, _ = load_google_authenticator(tmp_path, monkeypatch,
                                        **google_env(tmp_path, REAPER_HUB_ALLOWED_USERS="alice"))
    assert auth.allow_existing_users and not auth.allow_all
    assert (await google_says(auth, monkeypatch, "alice@mila.quebec"))["name"] == "alice"
    assert await google_says(auth, monkeypatch, "newcomer@mila.quebec") is None


def test_missing_google_settings_stop_the_hub_with_their_names(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="REAPER_GOOGLE_CLIENT_SECRET.*REAPER_GOOGLE_HOSTED_DOMAIN"):
        load_google_authenticator(tmp_path, monkeypatch, REAPER_GOOGLE_CLIENT_ID=CLIENT_ID)


def test_the_notices_default_address_follows_the_hubs_domain():
    from reaper.config import parse_settings

    text = (Path(__file__).resolve().parents[2] / "config.yaml").read_text()
    env = {"SMTP_PASSWORD": "x", "SLACK_BOT_TOKEN": "x"}
    assert parse_settings(text, env=env).notify.email.address_template == "{username}@mila.quebec"
    other = parse_settings(text, env={**env, "REAPER_MAIL_DOMAIN": "example.edu"})
    assert other.notify.email.address_template == "{username}@example.edu"
