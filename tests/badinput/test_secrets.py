"""Tokens and passwords never appear in logs, exception messages, the store, check-config's output
or the metrics — even when the SMTP login and the Slack calls that use them fail.

Real parts started: JupyterHub 6 (local spawner) with configurable-http-proxy and one single-user
server; a real SMTP server (aiosmtpd) that requires AUTH and refuses our password; a loopback
stand-in of the Slack Web API that answers `invalid_auth` to our token; the reaper's SQLite store.
Everything is captured at DEBUG for every logger (httpx, httpcore, aiosmtplib, slack_sdk included)
and searched for the secrets, also base64-encoded as SMTP AUTH sends them.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable
from pathlib import Path

import pytest
from sqlalchemy import MetaData, select

from reaper.config import load_settings
from reaper.core.model import Action
from reaper.hub import HubClient, ProbeOptions
from reaper.notify.outbox import DeliveryError
from reaper.service import make_outbox
from reaper.store import Store
from reaper.sweep import Sweeper
from tests.adapters.slack_standin import SlackStandin
from tests.adapters.smtp_sink import SmtpSink

REPO = Path(__file__).resolve().parents[2]
SMTP_PASSWORD = "SMTP-PASS-5678"
SLACK_TOKEN = "xoxb-SECRET-TOKEN-1234"
DB_PASSWORD = "DB-PASS-9012"
USER = "secrets-user"

CONFIG = """\
sweep_every: 1s
log_level: DEBUG
database_url: "sqlite:///reaper.sqlite"
hub:
  timezone: UTC
  api_url: "%(api_url)s"
  api_token: "${HUB_TOKEN}"
  public_url: "%(public_url)s"
probe: {skip_fresh: false, timeout: 5s, attached_within: 3s}
safety: {max_stops_per_sweep: 0}
defaults:
  detached: {warn_after: 1s, stop_after: 10h}
  attached: {warn_after: 1s, stop_after: 10h}
  remind_every: 10h
  min_notice: 1h
  channels: [email, slack]
notify:
  retry_base: 1s
  max_attempts: 3
  email:
    host: 127.0.0.1
    port: %(smtp_port)d
    security: none
    username: reaper
    password: "${SMTP_PASSWORD}"
    from_addr: "Test Hub <reaper@example.org>"
    address_template: "{username}@example.org"
  slack:
    token: "${SLACK_BOT_TOKEN}"
    base_url: "%(slack_url)s"
    fallback_to_email: false
"""


def variants(secret: str, user: str = "reaper") -> set[str]:
    """The secret as it might leak: itself, and base64 as SMTP AUTH PLAIN / LOGIN carry it."""
    b64 = base64.b64encode
    return {
        secret,
        b64(secret.encode()).decode(),
        b64(f"\0{user}\0{secret}".encode()).decode(),
    }


def assert_clean(where: str, texts: Iterable[str], secrets: Iterable[str]) -> None:
    blob = "\n".join(texts)
    assert blob, f"nothing captured from {where}: the search would prove nothing"
    for s in secrets:
        for v in variants(s):
            assert v not in blob, f"{s!r} (as {v!r}) appears in {where}"


def exception_texts(e: BaseException) -> list[str]:
    out = ["".join(traceback.format_exception(e)), str(e), repr(e)]
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out += [str(cur), repr(cur), repr(getattr(cur, "args", ()))]
        cur = cur.__cause__ or cur.__context__
    return out


def store_texts(store: Store) -> list[str]:
    """Every value of every column of every table, as text."""
    meta = MetaData()
    meta.reflect(store.engine)
    out: list[str] = []
    with store.engine.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(select(table)):
                out += [str(v) for v in row]
    return out


@pytest.fixture
def capture_everything(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    for name in (
        "httpx",
        "httpcore",
        "aiosmtplib",
        "slack_sdk",
        "asyncio",
        "reaper",
        "sqlalchemy.engine",
        "apscheduler",
        "tornado",
    ):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


@pytest.mark.integration
async def test_no_secret_in_logs_exceptions_store_check_config_or_metrics(
    real_hub,  # noqa: F811
    tmp_path: Path,
    capture_everything: pytest.LogCaptureFixture,
) -> None:
    caplog = capture_everything
    hub_token = real_hub.service_token
    secrets = [SMTP_PASSWORD, SLACK_TOKEN, hub_token]
    real_hub.create_user(USER)
    if real_hub.server_model(USER) is None:
        real_hub.start_server(USER, user_options={"partition": "main"})

    sink = SmtpSink(users={"reaper": "the-right-password"}).start()  # our password is refused
    slack = SlackStandin(tokens={"xoxb-some-other-token"})  # our token: invalid_auth
    await slack.start()
    env = {"HUB_TOKEN": hub_token, "SMTP_PASSWORD": SMTP_PASSWORD, "SLACK_BOT_TOKEN": SLACK_TOKEN}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        CONFIG
        % {
            "api_url": real_hub.api_url,
            "public_url": real_hub.base_url,
            "smtp_port": sink.port,
            "slack_url": slack.base_url,
        }
    )
    settings = load_settings(cfg, env=env)
    store = Store.open(settings.database_url)
    client = HubClient(
        settings.hub.effective_api_url(),
        settings.hub.effective_token() or "",
        probes=ProbeOptions(public_url=real_hub.base_url, timeout=5),
    )
    exc_texts: list[str] = []
    try:
        outbox = make_outbox(settings, store)
        sweeper = Sweeper(settings, client, store, notifier=outbox)
        # sweep until the server is warned, then until the outbox gave up on both channels
        deadline = time.monotonic() + 60
        warned = False
        while time.monotonic() < deadline:
            res = await sweeper.run_once()
            assert res.ok, res.error
            if res.error:
                exc_texts.append(str(res.error))
            warned = warned or any(
                r.obs.server.user == USER and r.decision.action is Action.WARN for r in res.rows
            )
            if warned and store.outbox.depth() == 0:
                break
            await asyncio.sleep(1)
        assert warned, "the server was never warned: no notice was attempted"
        assert store.outbox.depth() == 0, "the outbox did not give up on the failing channels"

        # the failures really happened with our secrets: AUTH was tried and refused, Slack said invalid_auth
        assert not sink.messages
        assert slack.calls and all(c.response.get("error") == "invalid_auth" for c in slack.calls)
        assert all(c.token == SLACK_TOKEN for c in slack.calls)

        # exceptions raised by the channels themselves
        channels = outbox.channels if hasattr(outbox, "channels") else {}
        from reaper.notify.render import render, sample_context

        rendered = render("warning", sample_context())
        email = channels.get("email")
        slack_ch = channels.get("slack")
        assert email is not None and slack_ch is not None
        with pytest.raises(DeliveryError) as e1:
            await email.sender.send(f"{USER}@example.org", rendered)
        exc_texts += exception_texts(e1.value)
        with pytest.raises(DeliveryError) as e2:
            await slack_ch.sender.lookup_user(f"{USER}@example.org")
        exc_texts += exception_texts(e2.value)
        exc_texts += [repr(email), repr(email.sender), repr(slack_ch), repr(slack_ch.sender)]
    finally:
        await client.aclose()
        sink.stop()
        await slack.stop()

    # ---- logs, at DEBUG for every logger (records formatted with their exceptions)
    handler_text = caplog.text
    records = [r.getMessage() for r in caplog.records]
    records += ["".join(traceback.format_exception(*r.exc_info)) for r in caplog.records if r.exc_info]
    assert any("invalid_auth" in r for r in records), "the Slack failure was not logged"
    assert any("535" in r or "uthentication" in r for r in records), "the SMTP login failure was not logged"
    assert_clean("the logs", [handler_text, *records], secrets)

    # ---- exception messages
    assert_clean("exception messages", exc_texts, [SMTP_PASSWORD, SLACK_TOKEN, hub_token])

    # ---- the store: every column of every table
    texts = store_texts(store)
    store.close()
    assert any("invalid_auth" in t for t in texts), "the Slack failure reason was not recorded"
    assert_clean("the store", texts, secrets)

    # ---- check-config output (valid file: the effective settings are printed)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("REAPER_", "JUPYTERHUB_"))}
    run_env.update(env, PYTHONPATH=str(REPO))
    r = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "reaper.cli", "check-config", str(cfg)],
        capture_output=True,
        text=True,
        env=run_env,
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "password: (set)" in r.stdout and "token: (set)" in r.stdout
    assert_clean("check-config output", [r.stdout, r.stderr], secrets)

    # ---- metrics
    from reaper.metrics import METRICS

    metrics = METRICS.exposition().decode()
    assert "reaper_" in metrics
    assert_clean("the metrics", [metrics], secrets)


def test_a_database_password_is_never_shown_by_check_config_or_a_failed_connection(tmp_path: Path) -> None:
    """A PostgreSQL URL with ${REAPER_DB_PASSWORD}: check-config masks it, and the error of a
    connection that fails (nothing listens on port 9) does not carry it."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text('database_url: "postgresql+psycopg://reaper:${REAPER_DB_PASSWORD}@127.0.0.1:9/reaper"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REAPER_", "JUPYTERHUB_"))}
    env.update(REAPER_DB_PASSWORD=DB_PASSWORD, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-m", "reaper.cli", "check-config", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "reaper:***@127.0.0.1" in r.stdout
    assert_clean("check-config output", [r.stdout, r.stderr], [DB_PASSWORD])

    settings = load_settings(cfg, env={"REAPER_DB_PASSWORD": DB_PASSWORD})
    with pytest.raises(Exception) as e:  # noqa: PT011 - any failure; its text is what we check
        Store.open(settings.database_url).close()
    assert_clean("the connection error", exception_texts(e.value), [DB_PASSWORD])


def test_a_literal_secret_in_the_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f'notify:\n  slack:\n    token: "{SLACK_TOKEN}"\n  email:\n    password: {SMTP_PASSWORD}\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REAPER_", "JUPYTERHUB_"))}
    env.update(PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-m", "reaper.cli", "check-config", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode != 0
    assert f"{cfg}:3: notify.slack.token: secrets must come from the environment" in r.stderr
    assert f"{cfg}:5: notify.email.password: secrets must come from the environment" in r.stderr
    assert_clean("check-config output", [r.stdout, r.stderr], [SLACK_TOKEN, SMTP_PASSWORD])
