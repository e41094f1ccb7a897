"""The page and the sweep look a server's rule up the same way (Sweeper.rule_for), with its batch
job: a rule that matches by the job's GPUs gives the page's "keep running" the max_age the sweep
enforces."""

# ruff: noqa: F811  (pytest fixtures imported from tests.web are parameters here)
from __future__ import annotations

from datetime import datetime, timedelta

from reaper.batch.base import Job, JobState
from tests.web import hub_server, make_web, utcnow  # noqa: F401  (fixtures)

GPU_RULE = """
rules:
  - name: gpu
    match: {min_gpus: 1}
    max_age: 6h
"""


class JobsGuard:
    """A batch guard (reaper.ports.Guard) whose batch system lists one job with a GPU."""

    def __init__(self, jobs: dict[str, Job]) -> None:
        self.jobs = jobs

    async def hub_jobs(self):
        return self.jobs

    async def after_stop(self, server, outcome, now):
        return "gone"

    async def reconcile(self, servers, jobs, now, *, dry_run=False):
        return []


async def test_a_gpu_rule_matched_by_the_batch_job_gives_the_page_the_sweeps_max_age(make_web):
    started = utcnow() - timedelta(hours=5)
    w = await make_web(GPU_RULE, [hub_server("alice", started=started, job_id="42")], sweep=False)
    sweeper = w.service.sweeper
    sweeper.stop_hook = JobsGuard({"42": Job("42", "alice", "jupyterhub-reaper", JobState.RUNNING, gpus=1)})
    res = await sweeper.run_once()
    [row] = res.rows
    assert row.rule.name == "gpu" and row.rule.max_age == timedelta(hours=6)  # the sweep's rule
    # the user_options say nothing of GPUs: only the job does; the page must use the same rule
    r = await w.post("keep", "alice", {"user": "alice", "server": "", "duration": "4h"},
                     headers={"Accept": "application/json"})
    body = r.json()
    assert r.status_code == 200 and body["result"] == "kept"
    assert datetime.fromisoformat(body["kept_until"]) == started + timedelta(hours=6)
    assert "shortened to the longest a server may run" in body["note"]
