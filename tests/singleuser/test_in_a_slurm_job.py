"""The companion in a single-user server run as a real Slurm batch job by our SlurmSpawner (the harness's
single-node Slurm, a real unix user): it loads there, answers the reaper's token, and reports neither the
job's batch script nor batchspawner's wrapper (the server's ancestors) as programs of the job."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.harness.hub import KernelChannel
from tests.integration.test_slurm_batch import HUB_USER, _no_jobs_left, slurm, slurm_hub  # noqa: F401

pytestmark = pytest.mark.integration


def _ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 1:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        pid = int(stat[stat.rfind(")") + 2:].split()[1])
        found.add(pid)
    return found


async def test_the_companion_reports_a_slurm_jobs_programs_but_not_its_batch_script(slurm: Any, slurm_hub: Any) -> None:
    model = await asyncio.to_thread(slurm_hub.start_server, HUB_USER, "",
                                    {"partition": "cpu", "runtime": "1:00:00", "memory": "1G"})
    base = f"{model['state']['server_url']}{model['url']}"
    auth = {"Authorization": f"token {slurm_hub.service_token}"}
    try:
        async with httpx.AsyncClient(timeout=30, headers=auth) as client:
            r = await client.post(f"{base}api/kernels", json={"name": "python3"})
            assert r.status_code == 201, r.text
            kid = r.json()["id"]
            ws = base.replace("http://", "ws://", 1) + f"api/kernels/{kid}/channels"
            ch = await asyncio.to_thread(KernelChannel, ws, auth, kid, 60)
            try:
                msg = ch.send("shell", "execute_request", {
                    "code": "import subprocess\nsubprocess.Popen(['sleep', '100000'], start_new_session=True)",
                    "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False,
                    "stop_on_error": True})
                await asyncio.to_thread(ch.wait_idle, msg, 60)
            finally:
                ch.close()
            r = await client.get(f"{base}api/reaper/activity")
            assert r.status_code == 200, r.text
            report = r.json()
        server = report["server"]["pid"]
        above = _ancestors(server)
        assert above  # slurmstepd, the batch script, batchspawner's wrapper ...
        assert not {p["pid"] for p in report["processes"]} & above
        assert [p["name"] for p in report["processes"] if p["started_by"] == "kernel" and p["source"] == kid] == ["sleep"]
        (kernel,) = [k for k in report["kernels"] if k["id"] == kid]
        assert isinstance(kernel["pid"], int) and kernel["pid"] not in {p["pid"] for p in report["processes"]}
    finally:
        await asyncio.to_thread(slurm_hub.stop_server, HUB_USER)
