"""The reaper killed with SIGKILL at each point of a sweep, then restarted: no duplicate notice, no
lost stop, no lost deadline. Two reaper processes on one database: only one acts.

Real parts: JupyterHub 6 + configurable-http-proxy + single-user servers (session hub), the reaper
as a real process (`python -m reaper.cli run --config ...`, as the hub would start it) talking to
the hub through a counting fault proxy (no faults injected: it counts the DELETEs), e-mail notices
to a real SMTP server (aiosmtpd) on loopback, the reaper's SQLite store.

The crash points (reaper/faults.py) are armed at a chosen moment by deleting the
REAPER_CRASH_ONCE_FILE marker: the process then SIGKILLs itself the next time it reaches the point.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.adapters.smtp_sink import SmtpSink
from tests.faults.conftest import FaultTally, running, server_processes, start_servers, stop_leftovers
from tests.harness.faultproxy import FaultProxy
from tests.harness.hub import RealHub

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SWEEP = 2.0  # sweep_every, seconds

CONFIG = """
sweep_every: 2s
database_url: "sqlite:///{db}"
hub: {{timezone: UTC, public_url: "{public}", timeout: 5s}}
probe: {{skip_fresh: false, attached_within: 1s}}
safety: {{max_stops_per_sweep: 5, max_stop_fraction: 1.0}}
defaults:
  exempt: true          # other tests' servers on the shared hub are never touched
  channels: [email]
rules:
  - name: crash
    match: {{users: ["{user}"]}}
    exempt: false
    detached: {{warn_after: 2s, stop_after: 7s}}
    attached: {{warn_after: 2s, stop_after: 7s}}
    remind_every: 1h
    min_notice: 1s      # shorter than a sweep: the sweep after the final notice is the stop sweep
notify:
  retry_base: 1s
  email:
    host: 127.0.0.1
    port: {port}
    security: none
    from_addr: "Test Hub <hub@example.org>"
    address_template: "{{username}}@example.org"
"""


class ReaperProcess:
    def __init__(self, cfg: Path, api_url: str, token: str, log: Path, **env: str) -> None:
        self.cfg, self.api_url, self.token, self.log_path, self.extra = cfg, api_url, token, log, env
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> ReaperProcess:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("REAPER_", "JUPYTERHUB_"))}
        env.update(JUPYTERHUB_API_URL=self.api_url, JUPYTERHUB_API_TOKEN=self.token, **self.extra)
        self._out = open(self.log_path, "ab")  # noqa: SIM115, ASYNC230 (closed in wait/stop; a local file)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "reaper.cli", "run", "--config", str(self.cfg),
            cwd=ROOT, env=env, stdout=self._out, stderr=asyncio.subprocess.STDOUT,
        )
        return self

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        self._out.close()
        return rc

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if not self._out.closed:
            self._out.close()


def kinds_for(sink: SmtpSink, user: str) -> list[str]:
    return [str(m.message["X-Reaper-Notice"]) for m in sink.messages if f"{user}@example.org" in m.rcpt_tos]


def final_sweep_done(log: str) -> bool:
    """The reaper's log shows a finished sweep after the one that sent the final notice."""
    sent = log.find("notice final sent")
    return sent >= 0 and "sweep done" in log[sent:]


def db_rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as con:
        return list(con.execute(sql))


async def until(pred: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(interval)


@pytest.mark.parametrize("point", ["after-record", "after-notify", "after-stop"])
async def test_sigkill_at_each_point_then_restart_one_notice_each_no_lost_stop_deadline_kept(
    real_hub: RealHub, tmp_path: Path, fault_tally: FaultTally, point: str
) -> None:
    user = f"crash-{point.replace('after-', '')}"
    sink = SmtpSink().start()
    proxy = await FaultProxy(real_hub.hub_url, name="counting-proxy").start()
    db = tmp_path / "reaper.sqlite"
    cfg = tmp_path / "reaper.yaml"
    cfg.write_text(CONFIG.format(db=db, public=real_hub.base_url, port=sink.port, user=user))
    marker = tmp_path / "crash-once"
    api = proxy.url + "/hub/api"
    procs: list[ReaperProcess] = []
    try:
        start_servers(real_hub, [user])
        pids = server_processes(user)
        if point == "after-record":
            # armed from the start; by the first sweep the server is idle past warn_after
            await asyncio.sleep(2.5)
        else:
            marker.write_text("disarmed")
        crashing = await ReaperProcess(cfg, api, real_hub.service_token, tmp_path / "reaper1.log",
                                       REAPER_CRASH_AT=point, REAPER_CRASH_ONCE_FILE=str(marker)).start()
        procs.append(crashing)
        final_at = None
        if point != "after-record":
            await until(lambda: "final" in kinds_for(sink, user) or crashing.returncode is not None, 40,
                        "the final notice")
            final_at = time.time()
            # Arm only once the sweep that sent the final notice is over: the mail reaches the sink
            # before that sweep passes its own after-notify point, and arming earlier would kill it.
            await until(lambda: final_sweep_done(crashing.log()) or crashing.returncode is not None, 20,
                        "the end of the sweep that sent the final notice")
            marker.unlink()  # armed: the next sweep (the stop sweep) dies at `point`
        rc = await crashing.wait(30)
        assert rc == -signal.SIGKILL, f"exit {rc}\n{crashing.log()}"
        log1 = crashing.log()
        kinds_at_crash = kinds_for(sink, user)
        queued = db_rows(db, "select kind, delivered_at from reaper_notices")
        if point == "after-record":
            assert kinds_at_crash == [], kinds_at_crash  # decided and queued, not delivered
            # (the warning, or the final notice when the first sweep came past stop_after - min_notice)
            assert len(queued) == 1 and queued[0][1] is None and queued[0][0] in ("warning", "final"), queued
            assert user in running(real_hub, [user])
        elif point == "after-notify":
            assert f"{user} (default): detached -> stop" in log1, log1  # the crash sweep was the stop sweep
            # The stop was streamed (it goes out right after the look that decided it, its intent
            # durable first), and its outcome and "stopped" notice were recorded with its batch;
            # the notice goes out with the drain after the stops, which the crash came before:
            # the restarted reaper must deliver it, once, and repeat nothing else.
            assert proxy.count("DELETE", r".") == 1
            assert user not in running(real_hub, [user])
            assert "stopped" not in kinds_at_crash
            assert db_rows(db, "select count(*) from reaper_actions where kind = 'stop' and ok = 1") == [(1,)]
            assert db_rows(db, "select delivered_at from reaper_notices where kind = 'stopped'") == [(None,)]
        else:
            assert proxy.count("DELETE", r".") == 1
            assert user not in running(real_hub, [user])  # the hub stopped it ...
            assert "stopped" not in kinds_at_crash  # ... and the notice was not yet delivered
        t_crash = time.time()

        again = await ReaperProcess(cfg, api, real_hub.service_token, tmp_path / "reaper2.log").start()
        procs.append(again)
        try:
            await until(lambda: "stopped" in kinds_for(sink, user), 3 * SWEEP + 10,
                        "the stopped notice after the restart")
        except AssertionError:
            waiting = "another reaper process holds the lease" in again.log()
            fault_tally.add("reaper crash", f"SIGKILL {point}, then restart", 1,
                            note="restarted reaper never acted: it waits on the lease of the killed process"
                            if waiting else "restarted reaper never acted")
            raise AssertionError(
                f"the restarted reaper did not finish the job within {3 * SWEEP + 10:g}s (deadline lost)"
                + ("; it waits on the lease still held by the SIGKILLed process" if waiting else "")
                + f"\n--- restarted reaper ---\n{again.log()[-3000:]}"
            ) from None
        stopped_seen = time.time()
        await asyncio.sleep(2 * SWEEP + 0.5)  # two more sweeps: nothing may be repeated
        await again.stop()

        kinds = kinds_for(sink, user)
        deletes = proxy.count("DELETE", r".")
        dup = sum(max(0, kinds.count(k) - 1) for k in set(kinds))
        lost = sum(1 for k in ("final", "stopped") if k not in kinds)
        wrongful = 0
        orphans = len(server_processes(user) & pids)
        stop_rows = db_rows(db, "select at from reaper_actions where kind = 'stop' and ok = 1")
        note = f"{deletes} stop request(s); crash then restart"
        if final_at is not None:
            # the stop was due min_notice (1 s) after the final notice
            late = (stopped_seen - final_at) - 1.0
            note += f"; stop came {late:.1f}s after it was due (sweep every {SWEEP:g}s, restart included)"
            assert late <= 2 * SWEEP + 4, f"the deadline slipped by {late:.1f}s"
        fault_tally.add("reaper crash", f"SIGKILL {point}, then restart", 1, wrongful_stops=wrongful,
                        lost_notices=lost, duplicate_notices=dup, orphan_jobs=orphans, note=note)
        first = queued[0][0] if point == "after-record" else "warning"
        assert sorted(kinds) == sorted({first, "final", "stopped"}), kinds
        assert deletes == 1, f"{deletes} stop requests (lost or repeated stop)"
        assert len(stop_rows) == 1, stop_rows
        assert user not in running(real_hub, [user]) and orphans == 0
        assert t_crash <= stopped_seen
    finally:
        for p in procs:
            await p.stop()
        await proxy.close()
        sink.stop()
        stop_leftovers(real_hub, [user])


async def test_two_reaper_processes_on_one_database_only_one_acts_the_other_waits(
    real_hub: RealHub, tmp_path: Path, fault_tally: FaultTally
) -> None:
    user = "crash-twins"
    sink = SmtpSink().start()
    proxy = await FaultProxy(real_hub.hub_url, name="counting-proxy").start()
    db = tmp_path / "reaper.sqlite"
    cfg = tmp_path / "reaper.yaml"
    cfg.write_text(CONFIG.format(db=db, public=real_hub.base_url, port=sink.port, user=user))
    api = proxy.url + "/hub/api"
    procs: list[ReaperProcess] = []
    try:
        start_servers(real_hub, [user])
        pids = server_processes(user)
        procs = [await ReaperProcess(cfg, api, real_hub.service_token, tmp_path / f"reaper{i}.log").start()
                 for i in (1, 2)]
        await until(lambda: "stopped" in kinds_for(sink, user) or any(p.returncode is not None for p in procs),
                    40, "the stopped notice")
        await asyncio.sleep(2 * SWEEP + 0.5)
        died = [(i, p.returncode, p.log()[-1500:]) for i, p in enumerate(procs) if p.returncode is not None]
        if died:
            fault_tally.add("two reapers", "second reaper process on the same SQLite database", 1,
                            note=f"process {died[0][0]} exited {died[0][1]} at start")
        assert not died, f"a reaper process died instead of waiting: {died}"
        for p in procs:
            await p.stop()
        logs = [p.log() for p in procs]
        acted = [i for i, text in enumerate(logs) if "sweep done" in text]
        waited = [i for i, text in enumerate(logs) if "another reaper process holds the lease" in text]
        kinds = kinds_for(sink, user)
        deletes = proxy.count("DELETE", r".")
        dup = sum(max(0, kinds.count(k) - 1) for k in set(kinds))
        lost = sum(1 for k in ("warning", "final", "stopped") if k not in kinds)
        orphans = len(server_processes(user) & pids)
        fault_tally.add("two reapers", "second reaper process on the same SQLite database", 1,
                        lost_notices=lost, duplicate_notices=dup, orphan_jobs=orphans,
                        note=f"process {acted} swept, process {waited} waited; {deletes} stop request(s)")
        assert len(acted) == 1 and len(waited) == 1 and acted != waited, (acted, waited, logs)
        assert sorted(kinds) == ["final", "stopped", "warning"], kinds
        assert deletes == 1
    finally:
        for p in procs:
            await p.stop()
        await proxy.close()
        sink.stop()
        stop_leftovers(real_hub, [user])
