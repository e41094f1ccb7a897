"""The spawners sites run, each on the real Slurm and a real hub: their job ids, resources and
stops as the reaper sees them.

Real parts started: a single-node Slurm (munge, slurmctld, slurmd; tests/harness/slurm.py), and one
real JupyterHub per spawner from the shipped hub/jupyterhub_config.py (REAPER_HUB_SPAWNER):
- "batchspawner": stock batchspawner.SlurmSpawner 1.3 (job id in the state, no server address
  there: the proxy table gives it), on JupyterHub 6.x;
- "profiles": wrapspawner.ProfilesSpawner over batchspawner.SlurmSpawner (the child's state nested,
  user_options only {"profile": KEY}), on JupyterHub 6.x;
- "slurmform": slurmformspawner.SlurmFormSpawner 2.11 (options only from its form, submitted the
  way a browser does), on JupyterHub 5.4.x as the Alliance runs it. Debian's Slurm 22.05 has no
  `scontrol --json`, which slurmformspawner builds its form from: tests/harness/scontrol_json.py
  answers it from the real `scontrol show node`.
Servers are Slurm jobs of real unix users; sweeps run in-process with the service's token and the
Slurm batch adapter, and a rule on the GPU partition must be the one that stops each.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from reaper.batch import make_batch_system
from reaper.config import parse_settings
from reaper.hub import HubClient, ProbeOptions
from reaper.service import make_outbox, make_stop_hook
from reaper.store import Store
from reaper.sweep import Sweeper
from reaper.units import read_user_options
from tests.harness import require_real_part
from tests.harness.hub import HUB_CONFIG, RealHub, hub_bin
from tests.harness.hub import missing_parts as hub_missing
from tests.harness.slurm import SlurmCluster, create_unix_user
from tests.integration.test_slurm_batch import _no_jobs_left, slurm  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration

SHIM = Path(__file__).resolve().parents[1] / "harness" / "scontrol_json.py"

POLICY = """
sweep_every: 1s
hub: {{timezone: UTC}}
probe: {{skip_fresh: false, attached_within: 3s}}
safety: {{max_stops_per_sweep: 5, max_stop_fraction: 1.0}}
defaults:
  detached: {{warn_after: 1h, stop_after: 2h}}
  remind_every: 1h
  min_notice: 2s
  channels: [log]
rules:
  - name: gpu-jobs
    match: {{partitions: [gpu], min_gpus: 1}}
    detached: {{warn_after: 1s, stop_after: 4s}}
batch:
  system: slurm
  env: {{SLURM_CONF: "{conf}"}}
  timeout: 10
slurm: {{job_name: {job_name}, cancel_grace: 5s, cancel_retries: 3}}
"""

# spawner -> (JupyterHub version, unix user, the job name its batch script gives)
CASES: dict[str, tuple[str, str, str]] = {
    "batchspawner": ("6", "reapersite1", "spawner-jupyterhub"),
    "profiles": ("6", "reapersite2", "spawner-jupyterhub"),
    "slurmform": ("5.4", "reapersite3", "jupyterhub-reaper"),
}


def _site_hub(slurm: SlurmCluster, work: Path, spawner: str, version: str) -> RealHub:
    missing = hub_missing(version)
    require_real_part(not missing, f"a real JupyterHub {version} ({', '.join(missing)} missing)")
    work.mkdir(parents=True, exist_ok=True)
    wrapper = work / "jupyterhub_config.py"
    wrapper.write_text(
        f"load_subconfig({str(HUB_CONFIG)!r})\n"
        "c = get_config()  # noqa: F821\n"
        "c.Spawner.poll_interval = 1\n"
        "c.BatchSpawnerBase.startup_poll_interval = 0.3\n"
        # no job steps on this one-node cluster (as tests/integration/test_slurm_batch.py)
        "c.SlurmSpawner.req_srun = ''\n"
    )
    env = dict(slurm.env)
    if spawner == "slurmform":
        shim_dir = work / "shim"
        shim_dir.mkdir(exist_ok=True)
        shim = shim_dir / "scontrol"
        shutil.copy(SHIM, shim)
        shim.chmod(0o755)
        env["PATH"] = f"{shim_dir}{os.pathsep}{hub_bin(version)}{os.pathsep}{os.environ.get('PATH', '')}"
    hub = RealHub(work / "hub", spawner=spawner, extra_env=env, config_file=wrapper, version=version)
    return hub.start()


@pytest.fixture(scope="module")
def site_hubs(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], RealHub]]:  # noqa: F811
    """site_hubs(spawner) -> its started hub (one per spawner, made on first use)."""
    hubs: dict[str, RealHub] = {}
    base = tmp_path_factory.mktemp("sitehubs")

    def get(spawner: str) -> RealHub:
        if spawner not in hubs:
            version, user, _job = CASES[spawner]
            create_unix_user(user)
            hubs[spawner] = _site_hub(slurm, base / spawner, spawner, version)
            hubs[spawner].create_user(user)
        return hubs[spawner]

    try:
        yield get
    finally:
        for hub in hubs.values():
            hub.stop()


def _start(hub: RealHub, spawner: str, user: str) -> dict[str, Any]:
    """A GPU server: 1 GPU on the gpu partition, asked for the way each spawner takes it."""
    if spawner == "batchspawner":
        # batchspawner copies user_options over its batch script's variables
        return hub.start_server(user, "", {"partition": "gpu", "gres": "gpu:1", "runtime": "4:00:00",
                                          "memory": "1G"})
    if spawner == "profiles":
        return hub.start_server(user, "", {"profile": "gpu"})  # the shipped "GPU" profile: 4 h, 4G
    form = hub.spawn_form(user)
    assert 'name="gpus"' in form and "gpu:1" in form, "slurmformspawner's form offers no GPU"
    return hub.start_server_from_form(
        user,
        {"account": "", "runtime": "1.5", "ui": "lab", "nprocs": "2", "memory": "1024", "gpus": "gpu:1",
         "profile": "default", "reservation": "", "partition": "gpu"},
    )


EXPECTED = {  # spawner -> (partition, gpus, walltime, cpus, memory MB) the reaper must read
    "batchspawner": ("gpu", 1, timedelta(hours=4), None, 1024.0),
    "profiles": ("gpu", 1, timedelta(hours=4), 1, 4096.0),
    "slurmform": ("gpu", 1, timedelta(minutes=90), 2, 1024.0),
}


async def _job_ends(batch: Any, job_id: str, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = await batch.job(job_id)
        if job is None or job.finished:
            return True
        await asyncio.sleep(0.5)
    return False


@pytest.mark.parametrize("spawner", list(CASES))
async def test_site_spawner_job_and_options_are_read_rules_match_and_the_stop_cancels_the_job(
    spawner: str, slurm: SlurmCluster, site_hubs: Callable[[str], RealHub], tmp_path: Path  # noqa: F811
) -> None:
    version, user, job_name = CASES[spawner]
    hub = site_hubs(spawner)
    assert (hub.hub_version or "").startswith(version + ".")
    model = await asyncio.to_thread(_start, hub, spawner, user)
    settings = parse_settings(POLICY.format(conf=slurm.conf_path, job_name=job_name), env={})
    batch = make_batch_system(settings.batch)
    assert batch is not None
    jobs = await batch.jobs(user=user)
    assert len(jobs) == 1, jobs
    job = jobs[0]
    assert (job.name, job.partition, job.gpus) == (job_name, "gpu", 1)

    store = Store.open(f"sqlite:///{tmp_path / 'reaper.sqlite'}")
    client = HubClient(hub.api_url, hub.service_token, probes=ProbeOptions(public_url=hub.base_url))
    try:
        # what the hub adapter reads: the job id (nested for the profiles), the options, the address
        (server,) = [s for s in await client.list_active_servers() if s.user == user]
        assert server.job_id == job.id
        if spawner == "profiles":
            assert model["state"]["child_state"]["job_id"] == job.id and "job_id" not in model["state"]
        asked = read_user_options(server.user_options)
        assert (asked.partition, asked.gpus, asked.walltime, asked.cpus, asked.mem_mb) == EXPECTED[spawner]
        assert job.end is not None and job.start is not None and job.end - job.start == asked.walltime
        assert server.target is None  # no address in the state of these spawners: the proxy table
        await client.refresh_targets()
        target = await client.target_for(server)
        assert target is not None and target.startswith("http://127.0.0.1:")

        sweeper = Sweeper(settings, client, store, notifier=make_outbox(settings, store),
                          stop_hook=make_stop_hook(settings, store))
        stop_rows = []
        deadline = time.monotonic() + 60
        while not stop_rows:
            assert time.monotonic() < deadline, "no stop within 60 s"
            res = await sweeper.run_once()
            assert res.ok, res.error
            stop_rows = [r for r in res.rows if r.obs.server.user == user and r.decision.action.value == "stop"]
            await asyncio.sleep(1)
        assert stop_rows[0].decision.rule == "gpu-jobs", stop_rows[0].decision
        assert stop_rows[0].obs.job_id == job.id
        assert await _job_ends(batch, job.id), f"job {job.id} outlived its server"
        assert hub.server_model(user) is None
        kinds = {a.kind for a in store.reports.recent_actions(sweeper.clock() - timedelta(hours=1))}
        assert "stop" in kinds and ({"job-gone", "scancel"} & kinds), kinds
    finally:
        await client.aclose()
        store.close()
