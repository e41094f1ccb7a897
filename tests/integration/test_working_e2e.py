"""Work beyond the kernel, end to end: a server whose job runs a program is never stopped.

Real parts started: a single-node Slurm gathering job accounting (jobacct_gather/linux, so
``sstat`` answers), a real JupyterHub with our SlurmSpawner (each server a Slurm job of a real
unix user) and the companion extension in the single-user environment (or, in the last test,
without it). The reaper sweeps in-process with the service's token and the Slurm batch adapter,
test-sized thresholds. The browser's part is played as a browser does it: a terminal or kernel
websocket opened, a line typed or a cell run, the websocket closed (the tab closed).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import websocket

from reaper.config import parse_settings
from reaper.core.model import Action, State
from reaper.notify.channels import render_delivery
from reaper.store.context import NoticeContext
from reaper.store.models import NOTICES, RUNS
from tests.harness.hub import KernelChannel
from tests.integration.test_slurm_batch import (  # noqa: F401  (fixtures)
    HUB_USER,
    _no_jobs_left,
    make_slurm_hub,
    slurm,
)
from tests.integration.test_slurm_reaper import reaper_on

pytestmark = pytest.mark.integration

# A silent loop that uses a few % of a core, as a training script writing to a log file does.
LOOP = "import time; [(sum(range(300000)), time.sleep(0.02)) for _ in iter(int, 1)]"
PROTECT_IDLE = 25  # seconds a terminal command using no CPU protects the server

POLICY = """
sweep_every: 1s
hub: {{timezone: UTC}}
probe: {{skip_fresh: false, attached_within: 3s, working_cpu: "2%"}}
working: {{protect_idle: {protect}s}}
safety: {{max_stops_per_sweep: 10, max_stop_fraction: 1.0}}
defaults:
  detached: {{warn_after: 2s, stop_after: 8s}}
  remind_every: 1h
  min_notice: 2s
  channels: [log]
batch:
  system: slurm
  env: {{SLURM_CONF: "{conf}"}}
  timeout: 10
slurm: {{cancel_grace: 5s, cancel_retries: 3, walltime_notice: 1m}}  # (the jobs run 1 h: no walltime notice)
orphans: {{grace: 1h, cancel: false}}
"""


def settings_for(slurm: Any) -> Any:
    return parse_settings(POLICY.format(conf=slurm.conf_path, protect=PROTECT_IDLE), env={})


@pytest.fixture(scope="module")
def hub_with_companion(slurm: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    hub = make_slurm_hub(slurm, tmp_path_factory.mktemp("work-hub"), companion=True)
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def hub_without_companion(slurm: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    hub = make_slurm_hub(slurm, tmp_path_factory.mktemp("bare-hub"), companion=False)
    try:
        yield hub
    finally:
        hub.stop()


class Server:
    """One named server of HUB_USER, reached at its own address with the service's token."""

    def __init__(self, hub: Any, name: str) -> None:
        self.hub, self.name = hub, name
        model = hub.start_server(HUB_USER, name, {"partition": "cpu", "runtime": "1:00:00", "memory": "1G"})
        self.job_id = str(model["state"]["job_id"])
        self.base = f"{model['state']['server_url']}{model['url']}"
        self.auth = {"Authorization": f"token {hub.service_token}"}

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{self.base}{path}", json=body, headers=self.auth, timeout=30)
        assert r.status_code in (200, 201), r.text
        return dict(r.json())

    def type_in_terminal(self, line: str) -> str:
        """Open a terminal, type a line into it over its websocket, close the websocket (the tab)."""
        term = self._post("api/terminals", {})["name"]
        url = self.base.replace("http://", "ws://", 1) + f"terminals/websocket/{term}"
        ws = websocket.create_connection(url, header=[f"{k}: {v}" for k, v in self.auth.items()], timeout=30)
        try:
            ws.send(json.dumps(["stdin", line + "\r"]))
            time.sleep(1.0)  # the shell reads the line before the tab goes
        finally:
            ws.close()
        return str(term)

    def run_in_kernel(self, code: str) -> str:
        """Start a kernel, run one cell in it, close the notebook's websocket."""
        kid = self._post("api/kernels", {"name": "python3"})["id"]
        url = self.base.replace("http://", "ws://", 1) + f"api/kernels/{kid}/channels"
        ch = KernelChannel(url, self.auth, kid, 60)
        try:
            msg = ch.send("shell", "execute_request", {
                "code": code, "silent": False, "store_history": False, "user_expressions": {},
                "allow_stdin": False, "stop_on_error": True})
            ch.wait_idle(msg, 60)
        finally:
            ch.close()
        return str(kid)


def rows_by_name(res: Any) -> dict[str, Any]:
    return {r.obs.server.name: r for r in res.rows if r.obs.server.user == HUB_USER}


async def sweep_until(sweeper: Any, done: Any, timeout: float, seen: list[dict[str, Any]]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = await sweeper.run_once()
        assert res.ok, res.error
        seen.append(rows_by_name(res))
        if done(seen[-1]):
            return
        await asyncio.sleep(1)
    last = {n: (r.obs.state.value, r.decision.action.value, r.decision.reason) for n, r in seen[-1].items()}
    raise AssertionError(f"not reached in {timeout}s; last rows: {last}")


def notices_of(store: Any, name: str) -> list[tuple[str, dict[str, Any]]]:
    with store.engine.connect() as conn:
        q = (sa.select(NOTICES.c.kind, NOTICES.c.context, NOTICES.c.seq)
             .join(RUNS, RUNS.c.id == NOTICES.c.run_id)
             .where(RUNS.c.user == HUB_USER, RUNS.c.server == name)
             .order_by(NOTICES.c.id))
        return [(k, dict(c or {}) | {"_seq": s}) for k, c, s in conn.execute(q)]


async def test_programs_keep_their_servers_and_an_idle_shell_or_a_sleep_does_not(slurm, hub_with_companion, tmp_path):
    hub = hub_with_companion
    made = {}
    for name in ("loop", "popen", "thread", "shell", "sleep"):
        made[name] = await asyncio.to_thread(Server, hub, name)
    await asyncio.to_thread(made["loop"].type_in_terminal, f'python3 -c "{LOOP}"')
    await asyncio.to_thread(made["popen"].run_in_kernel,
                            "import subprocess, sys\n"
                            f"subprocess.Popen([sys.executable, '-c', {LOOP!r}], start_new_session=True)")
    await asyncio.to_thread(made["thread"].run_in_kernel,
                            "import threading, time\n"
                            "def spin():\n    while True:\n        sum(range(300000)); time.sleep(0.02)\n"
                            "threading.Thread(target=spin, daemon=True).start()")
    await asyncio.to_thread(made["shell"].type_in_terminal, "cd /tmp")  # a shell at its prompt
    await asyncio.to_thread(made["sleep"].type_in_terminal, "sleep 100000")
    started = time.monotonic()

    settings = settings_for(slurm)
    seen: list[dict[str, Any]] = []
    async with reaper_on(settings, hub, tmp_path) as (sweeper, store):
        def shell_and_sleep_stopped(rows: dict[str, Any]) -> bool:
            stopped = [n for n in ("shell", "sleep") if any(
                r.get(n) is not None and r[n].decision.action is Action.STOP for r in seen)]
            return len(stopped) == 2

        await sweep_until(sweeper, shell_and_sleep_stopped, 120, seen)
        # well past stop_after (8 s) for every server
        assert time.monotonic() - started > 8 + 2
        final = await sweeper.run_once()
        rows = rows_by_name(final)

        # the programs: working, never a notice, still running
        for name in ("loop", "popen", "thread"):
            assert rows[name].obs.state is State.WORKING, (name, rows[name].obs.detail)
            assert all(r[name].decision.action is Action.OK for r in seen if name in r), name
            assert notices_of(store, name) == [], name
            assert hub.server_model(HUB_USER, name) is not None, name
        assert "python" in rows["loop"].obs.detail and "terminal" in rows["loop"].obs.detail
        assert "kernel" in rows["thread"].obs.detail

        # the idle shell: no false protection (the job's first figure, server start-up included, is
        # only a baseline where the companion answers), stopped as before
        shell_states = [r["shell"].obs.state for r in seen if "shell" in r]
        assert State.WORKING not in shell_states, shell_states
        assert [k for k, _ in notices_of(store, "shell")][:1] == ["warning"]

        # the sleep: working while protect_idle lasts, then warned and stopped, the notice naming it
        sleep_rows = [r["sleep"] for r in seen if "sleep" in r]
        first_warned = next(i for i, r in enumerate(sleep_rows) if r.decision.action is Action.WARN)
        states = [r.obs.state for r in sleep_rows[:first_warned]]
        assert State.WORKING in states, states  # protected before it was warned
        warned = sleep_rows[first_warned]
        assert "sleep" in warned.obs.detail and "no CPU" in warned.obs.detail, warned.obs.detail
        assert time.monotonic() - started >= PROTECT_IDLE
        (kind, ctx), *_ = notices_of(store, "sleep")
        assert kind == "warning"
        seq = ctx.pop("_seq")
        text = render_delivery(SimpleNamespace(kind=kind, context=NoticeContext.from_json(ctx), seq=seq), settings,
                               datetime.now(UTC)).text
        assert "sleep in terminal" in text, text
        for name in ("shell", "sleep"):
            await asyncio.to_thread(
                hub.wait_for, lambda n=name: hub.server_model(HUB_USER, n) is None, 60, 0.5, f"{name} gone")
            assert slurm.squeue_state(made[name].job_id) in (None, "COMPLETING", "CANCELLED", "COMPLETED")
    for name in ("loop", "popen", "thread"):
        await asyncio.to_thread(hub.stop_server, HUB_USER, name)


async def test_without_the_companion_the_job_accounting_alone_protects_programs(slurm, hub_without_companion, tmp_path):
    hub = hub_without_companion
    loop = await asyncio.to_thread(Server, hub, "loop")
    popen = await asyncio.to_thread(Server, hub, "popen")
    shell = await asyncio.to_thread(Server, hub, "shell")
    await asyncio.to_thread(loop.type_in_terminal, f'python3 -c "{LOOP}"')
    await asyncio.to_thread(popen.run_in_kernel,
                            "import subprocess, sys\n"
                            f"subprocess.Popen([sys.executable, '-c', {LOOP!r}], start_new_session=True)")
    await asyncio.to_thread(shell.type_in_terminal, "cd /tmp")
    r = httpx.get(f"{loop.base}api/reaper/activity", headers=loop.auth, timeout=10)
    assert r.status_code == 404  # no companion in this environment

    seen: list[dict[str, Any]] = []
    async with reaper_on(settings_for(slurm), hub, tmp_path) as (sweeper, store):
        def shell_stopped(rows: dict[str, Any]) -> bool:
            return any(r.get("shell") is not None and r["shell"].decision.action is Action.STOP for r in seen)

        await sweep_until(sweeper, shell_stopped, 90, seen)
        await asyncio.sleep(3)
        rows = rows_by_name(await sweeper.run_once())
        for name in ("loop", "popen"):
            assert rows[name].obs.state is State.WORKING, (name, rows[name].obs.detail)
            assert "job" in rows[name].obs.detail, rows[name].obs.detail
            assert notices_of(store, name) == [], name
            assert hub.server_model(HUB_USER, name) is not None, name
    for name in ("loop", "popen"):
        await asyncio.to_thread(hub.stop_server, HUB_USER, name)
