"""Hostile data from the hub: user names that need escaping, very long and Unicode names, and
user-controlled `user_options` full of HTML and Slack control sequences.

Real parts started: JupyterHub 6 (local spawner) with configurable-http-proxy and one single-user
server per hostile user; a real SMTP server (aiosmtpd) and a loopback stand-in of the Slack Web API;
the reaper's SQLite store. One sweep warns every server (warn_after 1s); the warnings go out by
e-mail and Slack through the real channels.

What JupyterHub 6.1.1 accepts (measured): user names created over the API may hold spaces, quotes,
`& ? # \\ < > !`, tabs, Unicode and 300 characters, but not `/` nor a full HTML tag pair such as
`<script>…</script>`; server names must be "safe slugs" (lower-case letters, digits, single hyphens,
at most 30 characters), so `x%20y` or `<script>` are refused as server names (400); the hostile text a
user controls for a server is its `user_options` (and `display_name`, which the reaper does not use).
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import text

from reaper.config import parse_settings
from reaper.core.model import Action, State
from reaper.hub import HubClient, ProbeOptions
from reaper.service import make_outbox
from reaper.store import Store
from reaper.sweep import Sweeper
from tests.adapters.slack_standin import SlackStandin
from tests.adapters.smtp_sink import SmtpSink

pytestmark = pytest.mark.integration

SCRIPT = "<script>alert(1)</script>"
MRKDWN = "<!channel> <@U0ADMIN> *bold* _it_ `code` <https://evil.example|click>"

# (user, server name, user_options, display_name)
SERVERS: list[tuple[str, str, dict[str, Any], str | None]] = [
    ("o'neil", "", {"partition": SCRIPT, "note": MRKDWN}, None),
    (
        "o'neil",
        "gpu-1",
        {"partition": "main", "gpus": "1", "note": SCRIPT},
        "<img src=x onerror=alert(2)> my gpu",
    ),
    ("a b", "", {"partition": MRKDWN}, None),
    ("<!channel>", "", {"partition": "main", "x": "<!here|here>"}, None),
    ('q"u&o?t#e', "", {"partition": '"><svg onload=alert(3)>'}, None),
    ("é-ü-日本", "", {"partition": "ünïcode", "note": "日本語 <b>"}, None),
    ("x" * 200, "", {"partition": "main"}, None),
    ("back\\slash;semi", "", {"partition": "a&amp;b"}, None),
    ("*bold*_x~`y`", "a" * 30, {"partition": "<!everyone>"}, None),
]
USERS = sorted({u for u, _, _, _ in SERVERS})
SLACK_TOKEN = "xoxb-hostile-names-token"

CONFIG = """
sweep_every: 1s
hub: {timezone: UTC, name: "Test Hub", public_url: "%(public_url)s"}
probe: {skip_fresh: false, timeout: 5s, attached_within: 3s}
safety: {max_stops_per_sweep: 0}
defaults:
  detached: {warn_after: 1s, stop_after: 10h}
  attached: {warn_after: 1s, stop_after: 10h}
  remind_every: 10h
  min_notice: 1h
  channels: [email, slack]
notify:
  admin_contact: "support@example.org"
  email:
    host: 127.0.0.1
    port: %(smtp_port)d
    security: none
    from_addr: "Test Hub <reaper@example.org>"
    address_map: addresses.yaml
  slack:
    token: "${SLACK_TOKEN}"
    base_url: "%(slack_url)s"
    fallback_to_email: false
"""


def address(user: str) -> str:
    return f"user{USERS.index(user)}@example.org"


def server_path(hub_model: dict[str, Any]) -> str:
    return str(hub_model["url"])


@pytest.fixture
def hostile_servers(real_hub) -> Iterator[dict[tuple[str, str], dict[str, Any]]]:  # noqa: F811
    """Every hostile user with its servers running; yields the hub's own model of each server."""
    models: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        for user, name, options, display in SERVERS:
            real_hub.create_user(user)
            if display is None:
                models[(user, name)] = real_hub.start_server(user, name, user_options=options)
            else:  # the JupyterHub 6 body form with a display name
                path = real_hub._server_path(user, name)
                real_hub._ok(
                    real_hub.api("POST", path, json={"user_options": options, "display_name": display}),
                    201,
                    202,
                )
                models[(user, name)] = (
                    real_hub.start_server(user, name, user_options=options)
                    if real_hub.server_model(user, name) is None
                    else _wait_ready(real_hub, user, name)
                )
        yield models
    finally:
        for user, name, _, _ in SERVERS:
            if real_hub.server_model(user, name) is not None:
                real_hub.stop_server(user, name)


def _wait_ready(hub: Any, user: str, name: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model = hub.server_model(user, name)
        if model and model.get("ready"):
            return dict(model)
        time.sleep(0.2)
    raise AssertionError(f"{user}/{name} not ready")


def _slack_strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k not in ("url", "action_id", "type", "style"):
                yield from _slack_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _slack_strings(v)


_SLACK_LINK = re.compile(r"<(https?://[^|<>\s]+)(\|[^<>]*)?>")


def _slack_control(text: str) -> list[str]:
    """Every <...> sequence Slack would interpret that is not one of our own http(s) links."""
    rest = _SLACK_LINK.sub("", text)
    return re.findall(r"<[^>]*>?", rest)


async def test_hostile_names_are_probed_decided_recorded_and_rendered_escaped(
    real_hub,  # noqa: F811
    hostile_servers,
    tmp_path: Path,
) -> None:
    (tmp_path / "addresses.yaml").write_text(
        yaml.safe_dump({u: address(u) for u in USERS}, allow_unicode=True)
    )
    slack = SlackStandin(tokens={SLACK_TOKEN}, users={address(u): f"U{i:04d}" for i, u in enumerate(USERS)})
    await slack.start()
    sink = SmtpSink().start()
    store = Store.open(f"sqlite:///{tmp_path / 'reaper.sqlite'}")
    client = HubClient(
        real_hub.api_url, real_hub.service_token, probes=ProbeOptions(public_url=real_hub.base_url, timeout=5)
    )
    try:
        settings = parse_settings(
            CONFIG % {"smtp_port": sink.port, "slack_url": slack.base_url, "public_url": real_hub.base_url},
            "hostile.yaml",
            env={"SLACK_TOKEN": SLACK_TOKEN},
            base_dir=tmp_path,
        )
        sweeper = Sweeper(settings, client, store, notifier=make_outbox(settings, store))
        # Sweep until every hostile server was seen detached and warned (new servers turn
        # detached once their own activity is older than attached_within).
        warned: dict[tuple[str, str], Any] = {}
        deadline = time.monotonic() + 60
        while len(warned) < len(SERVERS) and time.monotonic() < deadline:
            res = await sweeper.run_once()
            assert res.ok, res.error
            for row in res.rows:
                key = (row.obs.server.user, row.obs.server.name)
                if key not in hostile_servers:
                    continue
                # probes reached the right server: never unreachable because of quoting
                assert row.obs.state is not State.UNREACHABLE, (key, row.obs.detail)
                assert row.obs.server.user_options == dict(
                    SERVERS[[(u, n) for u, n, _, _ in SERVERS].index(key)][2]
                )
                if row.decision.action is Action.WARN:
                    warned[key] = row
            await asyncio.sleep(1)
        assert set(warned) == set(hostile_servers), f"not warned: {set(hostile_servers) - set(warned)}"

        # every warning delivered on both channels (the outbox retries within a few sweeps)
        deadline = time.monotonic() + 30
        while (
            len(sink.messages) < len(SERVERS) or len(slack.messages) < len(SERVERS)
        ) and time.monotonic() < deadline:
            await sweeper.run_once()
            await asyncio.sleep(1)
        assert len(sink.messages) == len(SERVERS), [m.message["Subject"] for m in sink.messages]
        assert len(slack.messages) == len(SERVERS)

        # ---- the store round-trips every name and option exactly
        runs = {(r.user, r.server) for r in store.reports.runs_overview()}
        assert set(hostile_servers) <= runs
        with store.engine.connect() as conn:
            rows = conn.execute(text("SELECT user, server, user_options FROM reaper_runs")).all()
        stored = {(u, s): (json.loads(o) if isinstance(o, str) else o) for u, s, o in rows}
        for user, name, options, _ in SERVERS:
            assert stored[(user, name)] == options

        # ---- e-mail: HTML escaped, headers unbroken, links quoted as the hub quotes them
        shown_text: list[str] = []
        by_rcpt: dict[str, list[Any]] = {}
        for m in sink.messages:
            by_rcpt.setdefault(m.rcpt_tos[0], []).append(m)
        for user, name, options, _ in SERVERS:
            msgs = by_rcpt[address(user)]
            msg = next(m for m in msgs if (f'"{name}"' in str(m.message["Subject"])) == bool(name))
            subject = str(msg.message["Subject"])
            assert "\n" not in subject and "\r" not in subject
            plain = msg.message.get_body(("plain",)).get_content()
            page = msg.message.get_body(("html",)).get_content()
            server_link = real_hub.base_url + server_path(hostile_servers[(user, name)])
            assert server_link in plain, (server_link, plain)
            assert html.escape(server_link, quote=True) in page or server_link in page
            for value in [user, *map(str, options.values())]:
                if "<" in value:
                    assert value not in page, (value, page)
            # nothing a user controls turned into markup: parse the page as a browser would
            tags = _Tags()
            tags.feed(page)
            assert tags.names <= _HTML_TAGS, f"unexpected tags {tags.names - _HTML_TAGS} for {user!r}"
            assert not tags.handlers, f"event handler attributes {tags.handlers} for {user!r}"
            assert all(h.startswith((real_hub.base_url, "mailto:")) for h in tags.hrefs), tags.hrefs
            assert user in tags.text  # the name itself is shown, as text
            shown_text.append(tags.text)

        # hostile values were shown (as text), not just left out
        assert any(SCRIPT in t for t in shown_text), "no notice showed the <script> partition as text"
        assert any("<!channel>" in t for t in shown_text)

        # ---- Slack: the values are escaped; no <!channel>, <@U...> or foreign link survives
        for posted in slack.messages:
            texts = list(_slack_strings(posted.get("text"))) + list(_slack_strings(posted.get("blocks")))
            for t in texts:
                bad = _slack_control(t)
                assert not bad, f"Slack control sequences from user data: {bad} in {t!r}"
                for link in _SLACK_LINK.finditer(t):
                    assert link.group(1).startswith(real_hub.base_url), link.group(0)
        joined = json.dumps([m for m in slack.messages], ensure_ascii=False)
        assert "&lt;!channel&gt;" in joined and "&lt;script&gt;" in joined
    finally:
        await client.aclose()
        store.close()
        sink.stop()
        await slack.stop()


class _Tags(HTMLParser):
    """Tags, event-handler attributes, links and text of an HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.names: set[str] = set()
        self.handlers: list[str] = []
        self.hrefs: list[str] = []
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.names.add(tag)
        for k, v in attrs:
            if k.startswith("on"):
                self.handlers.append(f"{tag} {k}={v}")
            if k in ("href", "src") and v is not None:
                self.hrefs.append(v)

    def handle_data(self, data: str) -> None:
        self.text += data


_HTML_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "body",
    "style",
    "table",
    "tr",
    "td",
    "th",
    "tbody",
    "thead",
    "div",
    "p",
    "span",
    "a",
    "b",
    "strong",
    "em",
    "i",
    "br",
    "hr",
    "ul",
    "li",
    "ol",
    "code",
    "pre",
    "small",
    "h1",
    "h2",
    "h3",
    "center",
    "font",
}


def test_the_store_has_no_column_truncating_a_200_character_name() -> None:
    """JupyterHub accepts names of 200+ characters; the store's name columns hold 255."""
    from reaper.store.models import metadata

    for table in metadata.tables.values():
        for col in table.columns:
            if col.name in ("user", "server", "kept_by"):
                length = getattr(col.type, "length", None)
                assert length is None or length >= 255, (table.name, col.name, length)
