"""Database faults: the sweep fails cleanly (nothing stopped, no notice half-recorded) and the next
one succeeds. SQLite locked by another writer past the busy timeout; PostgreSQL stopped mid-sweep
and started again; and the whole warning -> final -> stop cycle end to end on PostgreSQL.

Real parts: JupyterHub 6 + configurable-http-proxy + single-user servers (session hub), the fault
proxy in front of the hub API (its hooks inject the database fault at the listing, i.e. after the
sweep has started and before anything is recorded), SQLite, a real PostgreSQL 15 cluster.
"""

from __future__ import annotations

import asyncio
import shlex
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.faults.conftest import FaultTally, Reaper, notice_counts, running, start_servers, stop_leftovers
from tests.harness import require_real_part
from tests.harness.faultproxy import FaultProxy
from tests.harness.hub import RealHub
from tests.harness.postgres import postgres_available, postgres_server

pytestmark = pytest.mark.integration

SQLITE_BUSY_TIMEOUT = 30.0  # reaper/store/repo.py: PRAGMA busy_timeout=30000 (not configurable)
LISTING = r"^/hub/api/users\?"


class WriteLock:
    """Another connection holding a SQLite write transaction (BEGIN IMMEDIATE) for `seconds`."""

    def __init__(self, db: Path, seconds: float) -> None:
        self.db, self.seconds = db, seconds
        self.held = threading.Event()
        self.released = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        con = sqlite3.connect(self.db, isolation_level=None, timeout=5)
        try:
            con.execute("BEGIN IMMEDIATE")
            self.held.set()
            time.sleep(self.seconds)
            con.execute("ROLLBACK")
        finally:
            con.close()
            self.released.set()

    def take(self) -> None:
        self.thread.start()
        assert self.held.wait(10), "could not take the write lock"


async def test_sqlite_locked_past_the_busy_timeout_fails_the_sweep_cleanly_and_the_next_succeeds(
    real_hub: RealHub, hub_proxy: FaultProxy, tmp_path: Path, fault_tally: FaultTally
) -> None:
    users = ["db-lock-a", "db-lock-b"]
    start_servers(real_hub, users)
    db = tmp_path / "r.sqlite"
    reaper = Reaper(real_hub, hub_proxy.url + "/hub/api", "db-lock-", f"sqlite:///{db}", page_size=200)
    lock = WriteLock(db, SQLITE_BUSY_TIMEOUT + 1.5)
    try:
        await asyncio.sleep(1.5)  # idle past warn_after: this sweep would queue a notice for each
        rule = hub_proxy.hook("GET", LISTING, lock.take, times=1)
        t0 = time.monotonic()
        res = await reaper.sweep()
        took = time.monotonic() - t0
        assert rule.injected == 1
        assert not res.ok, res.summary()
        assert "locked" in (res.error or ""), res.error
        assert res.stops == 0 and res.notices == 0
        assert lock.released.wait(10)
        half = reaper.notices(users)
        assert half == [], f"notices recorded by the failed sweep: {half}"
        assert running(real_hub, users) == sorted(users)
        hub_proxy.clear()

        res = await reaper.sweep()
        assert res.ok, res.error
        assert res.notices == 2, res.summary()
        counts = notice_counts(reaper.notices(users))
        delivered = [n for n in reaper.notices(users) if n.status == "delivered"]
        assert len(delivered) == 2 and max(counts.values()) == 1, counts
        fault_tally.add("database", f"SQLite write-locked by another connection for {lock.seconds:g}s "
                        f"(busy timeout {SQLITE_BUSY_TIMEOUT:g}s)", 1,
                        note=f"failed sweep took {took:.0f}s, recorded nothing; next sweep queued and delivered 2 of 2")
    finally:
        await reaper.close()
        hub_proxy.clear()
        stop_leftovers(real_hub, users)


def _pg_data_dir(url: str) -> Path:
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database, autocommit=True) as c:
        row = c.execute("SHOW data_directory").fetchone()
    assert row is not None
    return Path(row[0])


class PgCluster:
    """Stop and start the harness's cluster in place (same data, port and options)."""

    def __init__(self, url: str) -> None:
        self.data = _pg_data_dir(url)
        argv = shlex.split((self.data / "postmaster.opts").read_text())
        rest = argv[1:]
        i = rest.index("-D")
        del rest[i:i + 2]
        self.opts = shlex.join(rest)
        self.bin = Path(argv[0]).parent

    def _pg_ctl(self, *args: str) -> None:
        cmd = ["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D", str(self.data), *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60, cwd="/")

    def stop(self) -> None:
        self._pg_ctl("-m", "immediate", "-w", "stop")

    def start(self) -> None:
        self._pg_ctl("-o", self.opts, "-l", str(self.data.parent / "server.log"), "-w", "-t", "30", "start")


async def test_postgresql_stopped_mid_sweep_fails_cleanly_then_the_cycle_completes_end_to_end(
    real_hub: RealHub, hub_proxy: FaultProxy, tmp_path: Path, fault_tally: FaultTally
) -> None:
    ok, why = postgres_available()
    require_real_part(ok, f"PostgreSQL ({why})")
    users = ["db-pg-a", "db-pg-b"]
    with postgres_server("reaper_faults") as url:
        start_servers(real_hub, users)
        reaper = Reaper(real_hub, hub_proxy.url + "/hub/api", "db-pg-", url, page_size=200)
        cluster = PgCluster(url)
        try:
            # end to end on PostgreSQL: warning/final notices recorded there and delivered
            await reaper.drive_to_stop_due(users)
            before = notice_counts(reaper.notices(users))
            assert all(before.get((u, "final")) == 1 for u in users), before

            rule = hub_proxy.hook("GET", LISTING, cluster.stop, times=1)
            res = await reaper.sweep()
            assert rule.injected == 1
            assert not res.ok, res.summary()
            assert res.stops == 0
            wrongful = 2 - len(running(real_hub, users))
            assert wrongful == 0
            cluster.start()
            hub_proxy.clear()

            res = await reaper.sweep()
            assert res.ok, res.error
            assert res.stops == 2, res.summary()
            assert running(real_hub, users) == []
            await reaper.sweeper.notifier.drain(reaper.sweeper.clock())  # type: ignore[union-attr]
            after = notice_counts(reaper.notices(users))
            dup = sum(max(0, n - 1) for n in after.values())
            lost = sum(1 for u in users for k in ("final", "stopped") if after.get((u, k), 0) == 0)
            undelivered = [n for n in reaper.notices(users) if n.status != "delivered"]
            fault_tally.add("database", "PostgreSQL stopped (immediate) mid-sweep, started before the next", 1,
                            wrongful_stops=wrongful, lost_notices=lost + len(undelivered), duplicate_notices=dup,
                            note="failed sweep stopped nothing; next sweep stopped 2 of 2 (store on PostgreSQL)")
            assert (dup, lost, undelivered) == (0, 0, []), after

            # The database already down when a sweep starts: a failed sweep too, not an exception.
            cluster.stop()
            try:
                res = await reaper.sweep()
            except Exception as e:
                fault_tally.add("database", "PostgreSQL down when the sweep starts", 1,
                                note=f"run_once raised {type(e).__name__} instead of returning a failed sweep")
                raise AssertionError(
                    "Sweeper.run_once raised instead of failing the sweep cleanly (store.reports.start_sweep is "
                    f"outside the try in Sweeper._run): {type(e).__name__}: {str(e)[:300]}"
                ) from None
            finally:
                cluster.start()
            assert not res.ok and res.stops == 0
            fault_tally.add("database", "PostgreSQL down when the sweep starts", 1, note="sweep failed cleanly")
        finally:
            await reaper.close()
            hub_proxy.clear()
            stop_leftovers(real_hub, users)
