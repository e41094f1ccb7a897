"""The reaper and Slurm: no job outlives its server.

Real parts started: a single-node Slurm (munge, slurmctld, slurmd; tests/harness/slurm.py), a real
JupyterHub using our SlurmSpawner (servers are Slurm jobs of real unix users), the reaper's
SQLite store. Sweeps run in-process with the reaper service's token and the Slurm batch adapter.
The core path (a detached Slurm server stopped, its job gone) runs on each JupyterHub version in
HUB_VERSIONS (`slurm_core_hub`).
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from reaper.batch import make_batch_system
from reaper.config import parse_settings
from reaper.core.model import State
from reaper.hub import HubClient, ProbeOptions
from reaper.service import make_outbox, make_stop_hook
from reaper.store import Store
from reaper.sweep import Sweeper
from tests.harness.hub import DEFAULT_VERSION, HUB_VERSIONS
from tests.integration.test_slurm_batch import (  # noqa: F401  (fixtures)
    HUB_USER,
    OWNER,
    _no_jobs_left,
    make_slurm_hub,
    slurm,
    slurm_hub,
)

pytestmark = pytest.mark.integration

POLICY = """
sweep_every: 1s
hub: {{timezone: UTC}}
probe: {{skip_fresh: false, attached_within: 3s}}
safety: {{max_stops_per_sweep: 5, max_stop_fraction: 1.0}}
defaults:
  detached: {{warn_after: 2s, stop_after: 8s}}
  remind_every: 1h
  min_notice: 2s
  channels: [log]
batch:
  system: slurm
  env: {{SLURM_CONF: "{conf}"}}
  timeout: 10
  commands: {{scancel: "{scancel}"}}
slurm: {{cancel_grace: 5s, cancel_retries: 3, walltime_notice: 5h}}
orphans: {{grace: 2s, cancel: {cancel}}}
"""


@pytest.fixture(scope="module", params=HUB_VERSIONS, ids=lambda v: f"hub{v}")
def slurm_core_hub(request: pytest.FixtureRequest, slurm: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:  # noqa: F811
    """The Slurm hub of each JupyterHub version (the 6.x one is `slurm_hub` itself)."""
    if request.param == DEFAULT_VERSION:
        yield request.getfixturevalue("slurm_hub")
        return
    hub = make_slurm_hub(slurm, tmp_path_factory.mktemp(f"slurmhub{request.param}"), request.param)
    try:
        yield hub
    finally:
        hub.stop()


def settings_for(slurm: Any, *, scancel: str = "scancel", cancel: bool = True) -> Any:
    return parse_settings(
        POLICY.format(conf=slurm.conf_path, scancel=scancel, cancel=str(cancel).lower()), env={}
    )


def reaper(settings: Any, hub: Any, tmp_path: Path) -> tuple[Sweeper, Store, HubClient]:
    store = Store.open(f"sqlite:///{tmp_path / 'reaper.sqlite'}")
    client = HubClient(hub.api_url, hub.service_token, probes=ProbeOptions(public_url=hub.base_url))
    sweeper = Sweeper(settings, client, store, notifier=make_outbox(settings, store),
                      stop_hook=make_stop_hook(settings, store))
    return sweeper, store, client


def running_orphan(slurm: Any) -> str:
    """A job with the hub's job name that no hub server owns, running."""
    job_id = slurm.sbatch("sleep 600", user=OWNER, name="jupyterhub-reaper", time_limit="1:00:00")
    slurm.wait_state(job_id, ["RUNNING"])
    return job_id


@contextlib.asynccontextmanager
async def reaper_on(settings: Any, hub: Any, tmp_path: Path) -> AsyncIterator[tuple[Sweeper, Store]]:
    sweeper, store, client = reaper(settings, hub, tmp_path)
    try:
        yield sweeper, store
    finally:
        await client.aclose()
        store.close()


async def past_the_orphan_grace(sweeper: Sweeper) -> Any:
    """One sweep that sees the orphan, the grace (2 s), one that acts on it."""
    first = await sweeper.run_once()
    assert first.orphans == 0  # not before the grace
    await asyncio.sleep(2.5)
    return await sweeper.run_once()


def flaky_scancel(tmp_path: Path, fails: int) -> str:
    """An scancel that fails `fails` times (like a busy slurmctld), then runs the real one."""
    counter = tmp_path / "scancel-count"
    script = tmp_path / "flaky-scancel"
    script.write_text(
        "#!/bin/sh\n"
        f'n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}\n'
        f'if [ "$n" -le {fails} ]; then echo "scancel: error: Socket timed out on send/recv operation" >&2; exit 1; fi\n'
        'exec scancel "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(script)


async def job_ends(batch: Any, job_id: str, timeout: float = 30) -> bool:
    """True once Slurm says the job is gone or finished (COMPLETING lasts a moment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = await batch.job(job_id)
        if job is None or job.finished:
            return True
        await asyncio.sleep(0.5)
    return False


async def sweeps_until(sweeper: Sweeper, predicate: Any, timeout: float = 60) -> list[Any]:
    results = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = await sweeper.run_once()
        assert res.ok, res.error
        results.append(res)
        if predicate(res):
            return results
        await asyncio.sleep(1)
    raise AssertionError(f"not reached; last rows: {[(r.obs.server.user, r.obs.state, r.decision.reason) for r in results[-1].rows]}")


async def test_detached_slurm_server_is_stopped_and_its_job_is_gone(slurm, slurm_core_hub, tmp_path):
    options = {"partition": "gpu", "gpus": 1, "runtime": "4:00:00", "memory": "1G"}
    model = await asyncio.to_thread(slurm_core_hub.start_server, HUB_USER, "", options)
    job_id = model["state"]["job_id"]
    settings = settings_for(slurm)
    sweeper, store, client = reaper(settings, slurm_core_hub, tmp_path)
    batch = make_batch_system(settings.batch)
    try:
        results = await sweeps_until(sweeper, lambda r: r.stops == 1)
        seen = [row for res in results for row in res.rows if row.obs.server.user == HUB_USER]
        assert seen[0].obs.job_id == job_id
        assert seen[0].obs.job_end is not None  # the walltime end, from squeue
        assert any(row.obs.state is State.DETACHED for row in seen)
        assert await job_ends(batch, job_id)
        assert slurm_core_hub.server_model(HUB_USER) is None
        kinds = {a.kind for a in store.reports.recent_actions(sweeper.clock() - timedelta(hours=1))}
        assert "stop" in kinds and ({"job-gone", "scancel"} & kinds)
        notices = [n.kind for n in store.reports.recent_notices(sweeper.clock() - timedelta(hours=1))]
        assert "walltime" in notices  # the 4 h walltime ends within walltime_notice (5 h)
    finally:
        await client.aclose()
        store.close()


async def test_a_job_no_hub_server_owns_is_an_orphan_cancelled_after_the_grace(slurm, slurm_hub, tmp_path):
    job_id = running_orphan(slurm)
    settings = settings_for(slurm)
    batch = make_batch_system(settings.batch)
    async with reaper_on(settings, slurm_hub, tmp_path) as (sweeper, store):
        res = await past_the_orphan_grace(sweeper)
        assert res.orphans == 1
        assert await job_ends(batch, job_id)
        acts = store.reports.recent_actions(sweeper.clock() - timedelta(hours=1))
        assert any(a.kind == "scancel" and a.job_id == job_id and "orphan" in a.detail for a in acts)
        notices = store.reports.recent_notices(sweeper.clock() - timedelta(hours=1))
        assert [n.kind for n in notices if n.user == OWNER] == ["orphan"]


async def test_orphans_are_reported_not_cancelled_when_cancel_is_false(slurm, slurm_hub, tmp_path):
    job_id = running_orphan(slurm)
    async with reaper_on(settings_for(slurm, cancel=False), slurm_hub, tmp_path) as (sweeper, store):
        await past_the_orphan_grace(sweeper)
        assert slurm.squeue_state(job_id) == "RUNNING"
        acts = store.reports.recent_actions(sweeper.clock() - timedelta(hours=1))
        assert any(a.kind == "orphan-seen" and a.job_id == job_id for a in acts)


async def test_a_failing_scancel_is_retried_and_then_succeeds(slurm, slurm_hub, tmp_path):
    running_orphan(slurm)
    scancel = flaky_scancel(tmp_path, fails=2)
    async with reaper_on(settings_for(slurm, scancel=scancel), slurm_hub, tmp_path) as (sweeper, store):
        res = await past_the_orphan_grace(sweeper)
        assert res.orphans == 1
        assert int((tmp_path / "scancel-count").read_text()) == 3  # two failures, then the real one
        acts = store.reports.recent_actions(sweeper.clock() - timedelta(hours=1))
        assert any(a.kind == "scancel" and a.ok for a in acts)


async def test_an_scancel_that_keeps_failing_is_reported_and_the_job_is_not_forgotten(slurm, slurm_hub, tmp_path):
    job_id = running_orphan(slurm)
    scancel = flaky_scancel(tmp_path, fails=100)
    async with reaper_on(settings_for(slurm, scancel=scancel), slurm_hub, tmp_path) as (sweeper, store):
        await past_the_orphan_grace(sweeper)
        assert slurm.squeue_state(job_id) == "RUNNING"
        acts = store.reports.recent_actions(sweeper.clock() - timedelta(hours=1))
        failed = [a for a in acts if a.kind == "scancel-failed"]
        assert failed and "Socket timed out" in failed[0].detail and not failed[0].ok
        # the next sweep tries again: a failed cancel is not the end of it
        await sweeper.run_once()
        assert int((tmp_path / "scancel-count").read_text()) == 6
