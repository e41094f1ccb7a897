"""The Slurm batch adapter (reaper.batch.slurm) against a REAL single-node Slurm.

Real parts started here: munged, slurmctld and slurmd (tests/harness/slurm.py), once per module;
jobs are submitted with sbatch as real unix users. Parser tests at the end use captured output.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from reaper.batch import BatchError, JobState, make_batch_system
from reaper.batch.base import parse_cpu_seconds
from reaper.batch.pbs import PbsBatch
from reaper.batch.slurm import FORMAT, SlurmBatch, parse_slurm_time, parse_squeue
from tests.harness import require_real_part
from tests.harness.slurm import SlurmCluster, create_unix_user, missing_parts

OWNER = "reaperslurm1"
OTHER = "reaperslurm2"


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    missing = missing_parts()
    require_real_part(not missing, f"a real Slurm ({', '.join(missing)} missing)")
    with SlurmCluster.started() as cluster:
        create_unix_user(OWNER)
        create_unix_user(OTHER)
        yield cluster


@pytest.fixture(autouse=True)
def _no_jobs_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts on an empty cluster (8 CPUs fill up quickly with sleeping jobs)."""
    yield
    if "slurm" in request.fixturenames:
        request.getfixturevalue("slurm").cancel_all()


def batch_for(slurm: SlurmCluster, **kwargs: object) -> SlurmBatch:
    return SlurmBatch(env=slurm.env, timeout=kwargs.pop("timeout", 30), **kwargs)  # type: ignore[arg-type]


def unique_name() -> str:
    return f"reaper-test-{uuid.uuid4().hex[:8]}"


async def wait_gone(batch: SlurmBatch, job_id: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while await batch.job(job_id) is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still there after {timeout} s")
        await asyncio.sleep(0.3)


@pytest.mark.integration
async def test_jobs_lists_the_named_job_with_user_partition_node_resources_and_walltime(
    slurm: SlurmCluster,
) -> None:
    name = unique_name()
    before = datetime.now(UTC).replace(microsecond=0)
    job_id = slurm.sbatch(
        "sleep 300", user=OWNER, name=name, partition="gpu", gres="gpu:2", time_limit="10", mem="2G", cpus=2
    )
    slurm.sbatch("sleep 300", user=OWNER, name=name + "-other")
    slurm.wait_state(job_id, ["RUNNING"])
    batch = batch_for(slurm)

    jobs = await batch.jobs(name=name)

    assert [j.id for j in jobs] == [job_id]
    job = jobs[0]
    assert job.user == OWNER
    assert job.name == name
    assert job.state is JobState.RUNNING
    assert job.partition == "gpu"
    assert job.node == slurm.node
    assert job.gpus == 2
    assert job.cpus == 2
    assert job.mem_mb == 2048
    assert job.start is not None and job.start.tzinfo is not None
    assert before - timedelta(seconds=2) <= job.start <= datetime.now(UTC) + timedelta(seconds=2)
    assert job.end == job.start + timedelta(minutes=10)
    assert await batch.job(job_id) == job
    assert [j.id for j in await batch.jobs(name=name, user=OWNER)] == [job_id]
    assert await batch.jobs(name=name, user=OTHER) == []
    assert await batch.jobs(name=name, user="no-such-user-here") == []


@pytest.mark.integration
async def test_gpus_requested_with_gpus_flag_and_unlimited_walltime_has_no_end(slurm: SlurmCluster) -> None:
    name = unique_name()
    job_id = slurm.sbatch("sleep 300", user=OWNER, name=name, extra=["--gpus=1"])
    slurm.wait_state(job_id, ["RUNNING"])
    job = await batch_for(slurm).job(job_id)
    assert job is not None
    assert job.gpus == 1
    assert job.partition == "cpu"  # the default partition
    assert job.end is None  # MaxTime=INFINITE, no --time: Slurm prints NONE
    assert job.mem_mb is None  # nothing requested


@pytest.mark.integration
async def test_pending_job_has_no_node_start_or_end(slurm: SlurmCluster) -> None:
    name = unique_name()
    job_id = slurm.sbatch("sleep 300", user=OWNER, name=name, extra=["--hold"], time_limit="5")
    job = await batch_for(slurm).job(job_id)
    assert job is not None
    assert job.state is JobState.PENDING
    assert (job.node, job.start, job.end) == (None, None, None)
    assert [j.id for j in await batch_for(slurm).jobs(name=name)] == [job_id]


@pytest.mark.integration
async def test_a_pipe_in_the_job_name_does_not_shift_fields(slurm: SlurmCluster) -> None:
    name = f"odd|name|{uuid.uuid4().hex[:6]}"
    job_id = slurm.sbatch("sleep 300", user=OWNER, name=name, partition="gpu")
    job = await batch_for(slurm).job(job_id)
    assert job is not None and job.name == name and job.partition == "gpu" and job.user == OWNER


@pytest.mark.integration
async def test_cancel_makes_the_job_gone_and_cancelling_again_is_no_error(slurm: SlurmCluster) -> None:
    name = unique_name()
    job_id = slurm.sbatch("sleep 300", user=OWNER, name=name)
    slurm.wait_state(job_id, ["RUNNING"])
    batch = batch_for(slurm)

    await batch.cancel(job_id)
    await wait_gone(batch, job_id)

    assert await batch.jobs(name=name) == []
    assert slurm.squeue_state(job_id) in (None, "CANCELLED")
    await batch.cancel(job_id)  # already cancelled: success, not an error


@pytest.mark.integration
async def test_a_job_slurm_does_not_know_is_gone(slurm: SlurmCluster) -> None:
    batch = batch_for(slurm)
    assert await batch.job("987654") is None  # squeue: "Invalid job id specified"
    await batch.cancel("987654")


@pytest.mark.integration
async def test_cancel_as_the_user_through_a_runuser_prefix(slurm: SlurmCluster) -> None:
    job_id = slurm.sbatch("sleep 300", user=OWNER, name=unique_name())
    slurm.wait_state(job_id, ["RUNNING", "PENDING"])
    batch = batch_for(slurm, prefix="runuser -u {username} --")

    with pytest.raises(BatchError, match="(?i)permission denied"):
        await batch.cancel(job_id, user=OTHER)  # another user may not cancel it
    assert await batch.job(job_id) is not None

    await batch.cancel(job_id, user=OWNER)
    await wait_gone(batch, job_id)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["dead-controller", "unparsable"])
async def test_squeue_and_scancel_failures_are_batch_errors_never_gone(
    slurm: SlurmCluster, kind: str
) -> None:
    job_id = slurm.sbatch("sleep 300", user=OWNER, name=unique_name())
    slurm.wait_state(job_id, ["RUNNING"])
    broken = SlurmBatch(env={"SLURM_CONF": str(slurm.broken_conf(kind))}, timeout=20)

    with pytest.raises(BatchError) as err:
        await broken.job(job_id)
    assert err.value.returncode not in (None, 0)
    with pytest.raises(BatchError):
        await broken.jobs(name="jupyterhub-reaper")
    with pytest.raises(BatchError):
        await broken.cancel(job_id)
    # The real cluster still runs it.
    assert slurm.squeue_state(job_id) == "RUNNING"


@pytest.mark.integration
async def test_a_stopped_controller_is_a_batch_error_and_the_job_is_still_there_after(
    slurm: SlurmCluster,
) -> None:
    job_id = slurm.sbatch("sleep 300", user=OWNER, name=unique_name())
    slurm.wait_state(job_id, ["RUNNING"])
    batch = batch_for(slurm, timeout=4)
    slurm.stop_controller()
    try:
        with pytest.raises(BatchError):
            await batch.job(job_id)
        with pytest.raises(BatchError):
            await batch.cancel(job_id)
    finally:
        slurm.start_controller()
    job = await batch.job(job_id)
    assert job is not None and job.state is JobState.RUNNING


# --- CPU accounting: sstat (JobAcctGatherType=jobacct_gather/linux, no slurmdbd) ---------------------

BUSY = "python3 -c 'while True: pass'"


def counting_sstat(tmp_path: Path) -> Path:
    """The real sstat behind a script that records each call (to count the commands)."""
    script = tmp_path / "sstat"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/sstat-calls\nexec sstat "$@"\n')
    script.chmod(0o755)
    return script


async def poll_cpu(batch: SlurmBatch, ids: list[str], until: Any, timeout: float = 40) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        cpu = await batch.cpu_usage(ids)
        if until(cpu):
            return cpu
        if time.monotonic() > deadline:
            raise AssertionError(f"sstat never showed what was awaited: {cpu}")
        await asyncio.sleep(1)


@pytest.mark.integration
async def test_cpu_usage_grows_for_a_busy_job_stays_near_zero_for_a_sleeping_one_in_one_sstat(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    busy = slurm.sbatch(BUSY, user=OWNER, name=unique_name())
    asleep = slurm.sbatch("sleep 300", user=OWNER, name=unique_name())
    held = slurm.sbatch("sleep 300", user=OWNER, name=unique_name(), extra=["--hold"])
    for job_id in (busy, asleep):
        slurm.wait_state(job_id, ["RUNNING"])
    batch = batch_for(slurm, sstat=str(counting_sstat(tmp_path)))

    first = await poll_cpu(batch, [busy, asleep, held], lambda c: c.get(busy, 0) >= 1 and asleep in c)
    second = await poll_cpu(batch, [busy, asleep, held], lambda c: c.get(busy, 0) > first[busy])

    assert second[busy] > first[busy] >= 1
    assert second[asleep] <= 1  # `sleep` uses no CPU (sstat counts whole seconds)
    assert held not in second  # pending: no steps, so no figure (unknown, not zero)
    calls = (tmp_path / "sstat-calls").read_text().splitlines()
    assert all(c.startswith(f"-a -j {busy},{asleep},{held} ") for c in calls)  # one command per look


@pytest.mark.integration
async def test_cpu_usage_leaves_out_a_finished_job(slurm: SlurmCluster) -> None:
    done = slurm.sbatch("true", user=OWNER, name=unique_name())
    busy = slurm.sbatch(BUSY, user=OWNER, name=unique_name())
    slurm.wait_state(busy, ["RUNNING"])
    slurm.wait_state(done, ["COMPLETED", None])
    batch = batch_for(slurm)

    cpu = await poll_cpu(batch, [done, busy], lambda c: busy in c)

    assert list(cpu) == [busy]


@pytest.mark.integration
async def test_cpu_usage_sums_the_steps_of_a_job_not_only_its_batch_step(slurm: SlurmCluster) -> None:
    # The batch script only waits for srun; the CPU is used by step 0's two tasks.
    job_id = slurm.sbatch(f"srun -n2 {BUSY}", user=OWNER, name=unique_name(), extra=["-n2"])
    slurm.wait_state(job_id, ["RUNNING"])
    batch = batch_for(slurm)

    cpu = await poll_cpu(batch, [job_id], lambda c: c.get(job_id, 0) >= 4)

    r = slurm.run(["sstat", "-j", f"{job_id}.batch", "--noheader", "-P", "--format=AveCPU"])
    assert r.returncode == 0 and (parse_cpu_seconds(r.stdout.strip()) or 0) <= 1, r.stdout
    assert cpu[job_id] >= 4


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["dead-controller", "unparsable"])
async def test_cpu_usage_of_a_broken_slurm_is_a_batch_error_never_an_empty_answer(
    slurm: SlurmCluster, kind: str
) -> None:
    job_id = slurm.sbatch(BUSY, user=OWNER, name=unique_name())
    slurm.wait_state(job_id, ["RUNNING"])
    await poll_cpu(batch_for(slurm), [job_id], lambda c: job_id in c)
    broken = SlurmBatch(env={"SLURM_CONF": str(slurm.broken_conf(kind))}, timeout=20)

    # dead-controller: sstat exits 0 and says "couldn't get steps for job N", as for an ended job
    with pytest.raises(BatchError, match="none of the 1 jobs" if kind == "dead-controller" else "exit 1"):
        await broken.cpu_usage([job_id])
    with pytest.raises(BatchError, match="cannot run"):
        await batch_for(slurm, sstat="/nonexistent/sstat").cpu_usage([job_id])


@pytest.mark.integration
async def test_cpu_usage_with_the_controller_stopped_is_a_batch_error(slurm: SlurmCluster) -> None:
    job_id = slurm.sbatch(BUSY, user=OWNER, name=unique_name())
    slurm.wait_state(job_id, ["RUNNING"])
    batch = batch_for(slurm, timeout=10)
    await poll_cpu(batch, [job_id], lambda c: job_id in c)
    slurm.stop_controller()
    try:
        # sstat either gives up ("couldn't get steps", exit 0) or is killed at the timeout
        with pytest.raises(BatchError, match="none of the 1 jobs|timed out"):
            await batch.cpu_usage([job_id])
    finally:
        slurm.start_controller()
    assert job_id in await poll_cpu(batch, [job_id], lambda c: job_id in c)


# --- PBS through Debian's slurm-wlm-torque wrappers (qstat/qdel in Perl over the real Slurm) ----------


def torque_wrappers() -> tuple[str, str]:
    found = [shutil.which(c) for c in ("qstat", "qdel")]
    ok = all(found) and "Slurm" in Path(str(found[0])).read_text(errors="replace")
    require_real_part(bool(ok), "Debian's slurm-wlm-torque (qstat/qdel wrappers over Slurm)")
    return str(found[0]), str(found[1])


def pbs_for(slurm: SlurmCluster, **kwargs: Any) -> PbsBatch:
    qstat, qdel = torque_wrappers()
    kwargs.setdefault("format", "text")
    return PbsBatch(qstat=qstat, qdel=qdel, env=slurm.env, timeout=30, **kwargs)


@pytest.mark.integration
async def test_pbs_text_reads_the_slurm_torque_wrappers_qstat(slurm: SlurmCluster) -> None:
    name = unique_name()
    job_id = slurm.sbatch("sleep 300", user=OWNER, name=name, partition="gpu", time_limit="90", cpus=2)
    held = slurm.sbatch("sleep 300", user=OTHER, name=name, extra=["--hold"])
    slurm.wait_state(job_id, ["RUNNING"])
    batch = pbs_for(slurm)

    jobs = {j.id: j for j in await batch.jobs(name=name)}

    assert sorted(jobs) == sorted([job_id, held])
    job = jobs[job_id]
    assert (job.user, job.name, job.state, job.partition, job.node, job.cpus) == (
        OWNER, name, JobState.RUNNING, "gpu", slurm.node, 2)
    assert (jobs[held].user, jobs[held].state, jobs[held].node) == (OTHER, JobState.PENDING, None)
    assert await batch.job(job_id) == job
    assert [j.id for j in await batch.jobs(name=name, user=OTHER)] == [held]
    assert await batch.job("99999999") is None  # the wrapper: exit 153, nothing printed
    assert await batch.cpu_usage([job_id]) == {}  # the wrapper prints no resources_used: unknown


@pytest.mark.integration
async def test_pbs_qdel_through_the_wrapper_cancels_and_refuses_another_user(slurm: SlurmCluster) -> None:
    job_id = slurm.sbatch("sleep 300", user=OWNER, name=unique_name())
    slurm.wait_state(job_id, ["RUNNING"])
    as_user = pbs_for(slurm, prefix="runuser -u {username} --")

    with pytest.raises(BatchError, match="Access/permission denied"):  # printed on stdout, exit 1
        await as_user.cancel(job_id, user=OTHER)
    assert slurm.squeue_state(job_id) == "RUNNING"

    await as_user.cancel(job_id, user=OWNER)
    deadline = time.monotonic() + 20
    while await as_user.job(job_id) is not None:  # the wrapper lists it as C until Slurm purges it
        assert time.monotonic() < deadline, "still running after qdel"
        await asyncio.sleep(0.3)
    assert slurm.squeue_state(job_id) in ("CANCELLED", "COMPLETING", None)
    await as_user.cancel(job_id)  # already gone: the wrapper exits 1 silently, qstat says C -> success
    await as_user.cancel("99999999")  # unknown: exit 1 silently, qstat exit 153 -> success


@pytest.mark.integration
async def test_pbs_auto_finds_the_text_format_and_a_dead_controller_is_a_batch_error(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    qstat, _ = torque_wrappers()
    log = tmp_path / "qstat-calls"
    script = tmp_path / "qstat"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {qstat} "$@"\n')
    script.chmod(0o755)
    job_id = slurm.sbatch("sleep 300", user=OWNER, name=unique_name())
    slurm.wait_state(job_id, ["RUNNING"])
    batch = pbs_for(slurm, format="auto")
    batch.qstat = str(script)

    assert [j.id for j in await batch.jobs()] == [job_id]
    assert (await batch.job(job_id)) is not None
    assert log.read_text().splitlines() == ["-f -F json", "-x", "-f", f"-f {job_id}"]

    dead = PbsBatch(qstat=qstat, env={"SLURM_CONF": str(slurm.broken_conf())}, format="text", timeout=30)
    with pytest.raises(BatchError, match="Problem loading jobs"):
        await dead.jobs()
    with pytest.raises(BatchError, match="Problem loading jobs"):
        await dead.job(job_id)
    with pytest.raises(BatchError, match="Problem loading jobs"):
        await dead.cpu_usage([job_id])


@pytest.mark.integration
async def test_pbs_with_no_job_at_all_lists_nothing_though_the_wrapper_exits_153(slurm: SlurmCluster) -> None:
    qstat, _ = torque_wrappers()
    slurm.cancel_all()
    deadline = time.monotonic() + 60
    while slurm.run([qstat, "-f"]).returncode != 153:  # until Slurm has purged every ended job
        assert time.monotonic() < deadline, "Slurm still lists jobs"
        await asyncio.sleep(1)
    assert await pbs_for(slurm).jobs() == []
    assert await pbs_for(slurm).cpu_usage(["1"]) == {}


@pytest.mark.integration
async def test_a_command_that_hangs_times_out_and_its_process_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    fake = tmp_path / "squeue"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    fake.chmod(0o755)
    batch = SlurmBatch(squeue=str(fake), timeout=1)

    started = time.monotonic()
    with pytest.raises(BatchError, match="timed out"):
        await batch.job("1")
    assert time.monotonic() - started < 5
    pid = int(pid_file.read_text())
    await asyncio.sleep(0.2)
    assert not _alive(pid), "the timed-out squeue is still running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def test_the_event_loop_keeps_running_while_a_command_waits(tmp_path: Path) -> None:
    fake = tmp_path / "squeue"
    fake.write_text("#!/bin/sh\nsleep 1\n")
    fake.chmod(0o755)
    batch = SlurmBatch(squeue=str(fake), timeout=5)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.05)

    ticker = asyncio.create_task(tick())
    assert await batch.jobs() == []
    ticker.cancel()
    assert ticks >= 10


async def test_a_missing_command_is_a_batch_error() -> None:
    with pytest.raises(BatchError, match="cannot run"):
        await SlurmBatch(squeue="/nonexistent/squeue").job("1")


# --- parsing captured output (Slurm 22.05.8) ------------------------------------------------------------

CAPTURED = (
    "3|probeuser|COMPLETED|cpu|vm|vm|1|1|1|0|cpu=1,node=1,billing=1|N/A|N/A|N/A|2026-11-25T21:23:57|2026-11-25T21:23:58|j3\n"
    "2|probeuser|RUNNING|cpu|vm|vm|1|1|1|0|cpu=1,node=1,billing=1|gres:gpu:1|N/A|N/A|2026-11-25T21:23:57|NONE|j2\n"
    "1|probeuser|RUNNING|gpu|vm|vm|1|1|1|1000M|cpu=1,node=1,billing=1|N/A|gres:gpu:2|N/A|2026-11-25T21:23:44|2026-11-25T21:33:44|testjob\n"
    "7|bob|PENDING|gpu|(null)||2|2|8|16G|N/A|N/A|gres:gpu:a100:2|N/A|N/A|N/A|pend\n"
    "8|carol|RUNNING|gpu|n1|n[1-2]|2|2|8|4G|cpu=8,mem=8G,node=2,billing=8,gres/gpu=6|N/A|gres:gpu:3|N/A|2026-11-25T21:00:00|2026-11-26T21:00:00|alloc\n"
)


def test_the_format_ends_with_the_name_field() -> None:
    assert FORMAT.endswith(",Name:0")
    assert FORMAT.count("|") == 16


def test_parse_squeue_reads_states_gpus_memory_and_times_in_the_given_zone() -> None:
    paris = ZoneInfo("Europe/Paris")
    jobs = {j.id: j for j in parse_squeue(CAPTURED, tz=paris)}
    assert jobs["3"].finished and jobs["3"].state is JobState.COMPLETED
    assert jobs["2"].gpus == 1 and jobs["2"].end is None and jobs["2"].mem_mb is None
    assert jobs["1"].gpus == 2 and jobs["1"].mem_mb == 1000
    assert jobs["1"].start == datetime(2026, 11, 25, 20, 23, 44, tzinfo=UTC)  # 21:23 in Paris
    assert jobs["1"].end == datetime(2026, 11, 25, 20, 33, 44, tzinfo=UTC)
    assert jobs["7"].state is JobState.PENDING and jobs["7"].node is None and jobs["7"].gpus == 4
    assert jobs["7"].mem_mb == 16384 and jobs["7"].start is None
    assert jobs["8"].gpus == 6 and jobs["8"].mem_mb == 8192 and jobs["8"].node == "n1"


def test_a_line_with_too_few_fields_is_a_batch_error_not_an_empty_list() -> None:
    with pytest.raises(BatchError):
        parse_squeue("1|alice|RUNNING\n")


def test_parse_slurm_time_without_a_zone_uses_the_local_zone() -> None:
    local = parse_slurm_time("2026-01-02T03:04:05")
    assert local == datetime(2026, 1, 2, 3, 4, 5).astimezone().astimezone(UTC)
    assert parse_slurm_time("N/A") is None and parse_slurm_time("Unknown") is None


def test_make_batch_system_reads_the_config_section() -> None:
    b = make_batch_system(
        {
            "system": "slurm",
            "commands": {"squeue": "/opt/bin/squeue"},
            "prefix": "sudo -n -u {username}",
            "env": {"SLURM_CONF": "/x"},
            "timeout": 7,
            "timezone": "UTC",
        }
    )
    assert isinstance(b, SlurmBatch)
    assert b.squeue == "/opt/bin/squeue" and b.scancel == "scancel" and b.runner.timeout == 7
    assert b.runner.argv(["scancel", "1"], "alice") == ["sudo", "-n", "-u", "alice", "scancel", "1"]
    assert b.runner.argv(["scancel", "1"]) == ["scancel", "1"]
    assert make_batch_system({"system": "none"}) is None
    assert make_batch_system({}, runs=lambda command: False) is None  # auto, and nothing runs
    with pytest.raises(ValueError):
        make_batch_system({"system": "slurm", "comands": {}})
    with pytest.raises(ValueError):
        make_batch_system({"system": "lsf"})


# --- the shipped hub with our SlurmSpawner, on the real Slurm ----------------------------------------
# Real parts: the Slurm above, plus a real JupyterHub 6 (tests/harness/hub.py) from the shipped
# hub/jupyterhub_config.py in Slurm mode (REAPER_HUB_SPAWNER=slurm), loaded from a small wrapper
# config that adds test settings (fast polls, option choices). Servers run as Slurm jobs of real
# unix users, started through runuser (no sudo here: the spawner's default picks runuser).

HUB_USER = "reaperhub1"


def make_slurm_hub(slurm: SlurmCluster, work: Path, version: str = "6", **hub_args: Any) -> Any:
    """A started real hub (JupyterHub `version`) with our SlurmSpawner and test settings (``hub_args``
    go to RealHub, e.g. ``companion=False``)."""
    from tests.harness.hub import HUB_CONFIG, RealHub
    from tests.harness.hub import missing_parts as hub_missing

    missing = hub_missing(version)
    require_real_part(not missing, f"a real JupyterHub {version} ({', '.join(missing)} missing)")
    create_unix_user(HUB_USER)
    work.mkdir(parents=True, exist_ok=True)
    wrapper = work / "jupyterhub_config.py"
    wrapper.write_text(
        f"load_subconfig({str(HUB_CONFIG)!r})\n"
        "c = get_config()  # noqa: F821\n"
        "c.Spawner.poll_interval = 1\n"
        "c.SlurmSpawner.batch_command_timeout = 10\n"
        "c.SlurmSpawner.startup_poll_interval = 0.3\n"
        "c.SlurmSpawner.req_srun = ''\n"
        "c.SlurmSpawner.partition_choices = ['cpu', 'gpu']\n"
        "c.SlurmSpawner.gpu_partitions = ['gpu']\n"
        "c.SlurmSpawner.runtime_choices = ['1:00:00', '4:00:00']\n"
        "c.SlurmSpawner.memory_choices = ['1G', '2G']\n"
        "c.SlurmSpawner.max_gpus = 2\n"
    )
    hub = RealHub(work / "hub", spawner="slurm", extra_env=slurm.env, config_file=wrapper, version=version,
                  **hub_args)
    hub.start()
    try:
        hub.create_user(HUB_USER)
    except BaseException:
        hub.stop()
        raise
    return hub


@pytest.fixture(scope="module")
def slurm_hub(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    hub = make_slurm_hub(slurm, tmp_path_factory.mktemp("slurmhub"))
    try:
        yield hub
    finally:
        hub.stop()


def _wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s")
        time.sleep(0.3)


@pytest.mark.integration
async def test_hub_server_runs_as_a_slurm_job_with_its_options_and_stopping_it_removes_the_job(
    slurm: SlurmCluster, slurm_hub: Any
) -> None:
    options = {"partition": "gpu", "gpus": 1, "runtime": "4:00:00", "memory": "2G"}
    model = await asyncio.to_thread(slurm_hub.start_server, HUB_USER, "", options)
    state = model["state"]
    job_id = state["job_id"]
    batch = batch_for(slurm)

    job = await batch.job(job_id)
    assert job is not None and job.state is JobState.RUNNING
    assert (job.name, job.user, job.partition, job.gpus, job.mem_mb) == (
        "jupyterhub-reaper",
        HUB_USER,
        "gpu",
        1,
        2048,
    )
    assert job.start is not None and job.end == job.start + timedelta(hours=4)
    assert [j.id for j in await batch.jobs(name="jupyterhub-reaper", user=HUB_USER)] == [job_id]
    # The spawner's state carries the server's own address; it answers there, on loopback.
    assert state["server_url"].startswith("http://127.0.0.1:")
    import httpx

    async with httpx.AsyncClient() as client:
        r = await client.get(f"{state['server_url']}{model['url']}api/status",
                             headers={"Authorization": f"token {slurm_hub.admin_token}"})  # fmt: skip
    assert r.status_code in (200, 403), r.text  # it is the user's jupyter_server answering

    await asyncio.to_thread(slurm_hub.stop_server, HUB_USER)
    await wait_gone(batch, job_id)
    assert slurm_hub.server_model(HUB_USER) is None


@pytest.mark.integration
async def test_options_outside_the_admins_choices_are_refused_and_no_job_is_submitted(
    slurm: SlurmCluster, slurm_hub: Any
) -> None:
    batch = batch_for(slurm)
    before = {j.id for j in await batch.jobs(name="jupyterhub-reaper")}
    for bad in (
        {"gpus": 1, "partition": "cpu"},
        {"gpus": 3, "partition": "gpu"},
        {"memory": "64G"},
        {"cmd": "x"},
    ):
        r = slurm_hub.api("POST", f"users/{HUB_USER}/server", json=bad)
        if r.status_code in (201, 202):
            _wait_until(
                lambda: not (slurm_hub.server_model(HUB_USER) or {}).get("pending"), 30, "spawn to end"
            )
            assert slurm_hub.server_model(HUB_USER) is None, f"{bad} was accepted"
        else:
            assert r.status_code >= 400
    assert {j.id for j in await batch.jobs(name="jupyterhub-reaper")} == before


@pytest.mark.integration
async def test_an_squeue_error_does_not_make_the_hub_forget_a_running_job(
    slurm: SlurmCluster, slurm_hub: Any
) -> None:
    model = await asyncio.to_thread(slurm_hub.start_server, HUB_USER, "", {"partition": "cpu"})
    job_id = model["state"]["job_id"]
    good = slurm.conf_path.read_text()
    log_offset = slurm_hub.log_size()
    try:
        # squeue now fails with "Unable to process configuration file": not batchspawner's
        # "unknown" pattern, so stock batchspawner would take the job as gone and the hub would
        # drop the server. The daemons already read their config and keep running the job.
        slurm.conf_path.write_text("ClusterName=broken\nNotASlurmKey=1\n")
        _wait_until(
            lambda: slurm_hub.log_since(log_offset).count("Could not query job") >= 3,
            30,
            "three failed polls",
        )
        assert slurm_hub.server_model(HUB_USER) is not None, "the hub forgot the server"
    finally:
        slurm.conf_path.write_text(good)
    assert slurm.squeue_state(job_id) == "RUNNING"
    model = slurm_hub.server_model(HUB_USER)
    assert model is not None and model["ready"] and model["state"]["job_id"] == job_id
    await asyncio.to_thread(slurm_hub.stop_server, HUB_USER)
    await wait_gone(batch_for(slurm), job_id)
