"""SIGHUP reloads config.yaml in the running service; an invalid file is rejected with the same
file:line message as check-config, and the service keeps sweeping with the last good policy.

Real parts started: JupyterHub 6 (local spawner) with configurable-http-proxy and one single-user
server; the reaper service itself as a subprocess (`python -m reaper.cli run --config F`) with the
hub's service token; its own SQLite store. Decisions are read from the service's log lines
"reaper.sweep: USER (default): STATE -> ACTION: REASON".
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
USER = "hup-user"

BASE = """\
sweep_every: 1s
log_level: DEBUG
database_url: "sqlite:///reaper.sqlite"
hub: {timezone: UTC}
probe: {skip_fresh: false, timeout: 5s, attached_within: 3s}
safety: {max_stops_per_sweep: 0}
"""

# A: nothing is due for hours.
POLICY_A = (
    BASE
    + """\
defaults:
  detached: {warn_after: 10h, stop_after: 20h}
  attached: {warn_after: 10h, stop_after: 20h}
  channels: [log]
"""
)

# B: a rule exempts our user.
POLICY_B = (
    POLICY_A
    + """\
rules:
  - name: hup-exempt
    match: {users: [hup-user]}
    exempt: true
"""
)

# C: invalid (line 17: stop before warn) - if it were taken, the user would be warned at once.
POLICY_C = (
    BASE
    + """\
defaults:
  detached: {warn_after: 1s, stop_after: 20h}
  attached: {warn_after: 10h, stop_after: 20h}
  channels: [log]
rules:
  - name: hup-exempt
    match: {users: [hup-user]}
    exempt: false
    detached:
      warn_after: 2h
      stop_after: 1h
"""
)
C_LINE = 17

# D: valid again; warn after 1s.
POLICY_D = (
    BASE
    + """\
defaults:
  detached: {warn_after: 1s, stop_after: 20h}
  attached: {warn_after: 1s, stop_after: 20h}
  remind_every: 10h
  channels: [log]
"""
)


class ServiceLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8", errors="replace") if self.path.exists() else ""

    def size(self) -> int:
        return len(self.text())

    def wait_for(
        self, pattern: str, since: int, proc: subprocess.Popen[bytes], timeout: float = 30, count: int = 1
    ) -> list[re.Match[str]]:
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            found = list(rx.finditer(self.text()[since:]))
            if len(found) >= count:
                return found
            if proc.poll() is not None:
                raise AssertionError(
                    f"the service exited ({proc.returncode}) waiting for {pattern!r}:\n{self.text()[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{pattern!r} x{count} not in the log within {timeout}s:\n{self.text()[since:][-4000:]}"
                )
            time.sleep(0.2)


def decisions(text: str, user: str = USER) -> list[tuple[str, str, str]]:
    rx = re.compile(rf"reaper\.sweep: {re.escape(user)} \(default\): (\w+) -> ([\w-]+): (.*)$", re.M)
    return [(m.group(1), m.group(2), m.group(3)) for m in rx.finditer(text)]


@pytest.fixture
def service(real_hub, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, ServiceLog]]:  # noqa: F811
    real_hub.create_user(USER)
    if real_hub.server_model(USER) is None:
        real_hub.start_server(USER)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(POLICY_A)
    log = ServiceLog(tmp_path / "service.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REAPER_", "JUPYTERHUB_"))}
    env.update(
        {
            "JUPYTERHUB_API_TOKEN": real_hub.service_token,
            "JUPYTERHUB_API_URL": real_hub.api_url,
            "JUPYTERHUB_PUBLIC_URL": real_hub.base_url,
            "PYTHONPATH": str(REPO),
        }
    )
    with open(log.path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reaper.cli", "run", "--config", str(cfg)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc, cfg, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        real_hub.stop_server(USER)


def test_sighup_applies_a_new_policy_and_keeps_the_last_good_one_on_an_invalid_file(service) -> None:
    proc, cfg, log = service

    # Policy A: the server is seen and nothing is due.
    log.wait_for(r"reaper started", 0, proc)
    log.wait_for(rf"reaper\.sweep: {USER} \(default\): \w+ -> ok: ", 0, proc)
    assert all(action == "ok" for _, action, _ in decisions(log.text()))

    # Policy B (a rule exempting the user) by SIGHUP.
    mark = log.size()
    cfg.write_text(POLICY_B)
    proc.send_signal(signal.SIGHUP)
    log.wait_for(rf"SIGHUP: config reloaded from {re.escape(str(cfg))}", mark, proc)
    after_reload = log.size()
    log.wait_for(r"sweep done", after_reload, proc, count=2)
    seen = decisions(log.text()[after_reload:])
    assert seen and all(a == "exempt" and "rule hup-exempt" in why for _, a, why in seen), seen

    # Policy C is invalid: rejected with the same message as check-config; B stays in force.
    mark = log.size()
    cfg.write_text(POLICY_C)
    proc.send_signal(signal.SIGHUP)
    expected = (
        f"{cfg}:{C_LINE}: rules[0].detached.stop_after: stop_after (1h) must be later than warn_after (2h)"
    )
    log.wait_for(r"SIGHUP: config rejected, keeping the last good policy", mark, proc)
    log.wait_for(re.escape(expected), mark, proc)
    check = subprocess.run(
        [sys.executable, "-m", "reaper.cli", "check-config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert check.returncode != 0 and expected in check.stderr
    after_reject = log.size()
    log.wait_for(r"sweep done", after_reject, proc, count=3)
    assert proc.poll() is None, "the service must keep running after a rejected reload"
    seen = decisions(log.text()[after_reject:])
    assert seen and all(a == "exempt" for _, a, _ in seen), f"the last good policy was not kept: {seen}"
    assert "config reloaded" not in log.text()[mark:]

    # Policy D (valid) by SIGHUP: reloads still work after a rejection, and the next sweep warns.
    mark = log.size()
    cfg.write_text(POLICY_D)
    proc.send_signal(signal.SIGHUP)
    log.wait_for(r"SIGHUP: config reloaded", mark, proc)
    m = log.wait_for(rf"reaper\.sweep: {USER} \(default\): (\w+) -> warn: (.*)$", mark, proc)[0]
    assert m.group(1) in ("detached", "attached")
    assert proc.poll() is None


# --------------------------------------------------------------------------- what SIGHUP reloads
# (no real parts: the service object with a SQLite store and the scripted hub of tests/fakes.py)

RELOAD_A = """\
sweep_every: 5m
database_url: "sqlite:///{db}"
defaults:
  channels: [log]
"""

# e-mail and a batch system added; the database, the page's address and the hub client's timeout
# changed (each needs a restart)
RELOAD_B = """\
sweep_every: 5m
database_url: "sqlite:///{db}.other"
hub: {{timeout: 20s}}
web: {{listen: "http://127.0.0.1:9999"}}
notify:
  email: {{host: mail.example.org, port: 2525, security: none, from_addr: reaper@example.org}}
batch: {{system: slurm}}
slurm: {{job_name: hub-jobs}}
defaults:
  channels: [log, email]
"""


def reload_service(tmp_path: Path):
    from reaper.config import load_settings
    from reaper.service import ReaperService, make_outbox, make_stop_hook
    from reaper.store import Store
    from reaper.sweep import Sweeper
    from tests.fakes import FakeHub

    db = tmp_path / "r.sqlite"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(RELOAD_A.format(db=db))
    settings = load_settings(str(cfg))
    svc = ReaperService(str(cfg), settings)
    svc.store = Store.open(f"sqlite:///{db}")
    svc.outbox = make_outbox(settings, svc.store)
    svc.sweeper = Sweeper(settings, FakeHub(), svc.store, notifier=svc.outbox,
                          stop_hook=make_stop_hook(settings, svc.store))
    return svc, cfg, db


def test_sighup_rebuilds_the_channels_and_the_guard_and_names_each_setting_that_needs_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from reaper.batch.guard import JobGuard

    svc, cfg, db = reload_service(tmp_path)
    outbox = svc.outbox
    assert set(outbox.channels) == {"log", "lab"} and svc.sweeper.stop_hook is None
    cfg.write_text(RELOAD_B.format(db=db))
    with caplog.at_level("INFO", logger="reaper.service"):
        svc.reload()
    try:
        assert svc.settings is svc.sweeper.settings and svc.settings.hub.timeout.total_seconds() == 20
        # the same outbox (its drain lock), with the new channels
        assert svc.outbox is outbox and set(outbox.channels) == {"log", "lab", "email"}
        assert outbox.channels["lab"].hub is svc.hub  # the notice in JupyterLab reaches servers by the hub client
        guard = svc.sweeper.stop_hook
        assert isinstance(guard, JobGuard) and guard.job_name == "hub-jobs" and guard.channels == ["log", "email"]
        assert svc.sweeper.stops.guard is guard  # the stops (and the page's Stop now) use it too
        restart = [r.getMessage() for r in caplog.records if "needs a restart" in r.getMessage()]
        for key in ("database_url", "web.listen", "hub.timeout"):
            assert any(m.startswith(f"SIGHUP: {key} changed: it needs a restart") for m in restart), (key, restart)
        assert not any("notify" in m or "batch" in m for m in restart)
        assert any("3 setting(s) need a restart: database_url, web.listen, hub.timeout" in r.getMessage()
                   for r in caplog.records)
    finally:
        svc.store.close()


async def test_sighup_during_a_sweep_hands_the_new_guard_to_the_next_sweep(tmp_path: Path) -> None:
    from reaper.batch.guard import JobGuard

    svc, cfg, db = reload_service(tmp_path)
    try:
        cfg.write_text(RELOAD_B.format(db=db))
        async with svc.sweeper._lock:  # a sweep is running
            svc.reload()
            assert svc.sweeper.stop_hook is None  # not swapped under the running sweep
        svc.sweeper.stop_hook = None
        guard = svc._next_guard[0]
        assert isinstance(guard, JobGuard)
        guard.hub_jobs = lambda: _none()  # no Slurm here: the batch system lists nothing
        await svc.tick()
        assert svc.sweeper.stop_hook is guard and svc._next_guard is None
        assert svc.last_result is not None and svc.last_result.ok
    finally:
        svc.store.close()


async def _none() -> None:
    return None
