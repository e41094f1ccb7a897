"""Slurm over its command line: `squeue` to list and look up jobs, `scancel` to cancel.

Output format: `squeue --noheader --Format=field:0|,...` (`:0` = no truncation, `|` = the
delimiter). It works on Slurm 22.05 and later; the job name is the last field so a `|` in a
name cannot shift the others. `squeue --json` is not used: its schema changes with every
OpenAPI plugin version (v0.0.38 in 22.05, v0.0.39+ later).

Times: Slurm prints local time without a zone (`2026-11-25T21:23:44`). They are read in the
configured zone (`tz`, default: this process's local zone, which should match the Slurm
controller's) and returned as UTC.

GPUs: from the allocated TRES (`tres-alloc`, `gres/gpu=N`, when accounting tracks it), else the
request: `tres-per-job` (`--gpus=N`), `tres-per-node` x nodes (`--gres=gpu:N`, `%b`),
`tres-per-task` x tasks (`--gpus-per-task`).

CPU accounting (`cpu_usage`): one `sstat -a -j A,B,C --noheader -P --format=JobID,TRESUsageInTot,
AveCPU,NTasks` for all jobs. It needs `JobAcctGatherType=jobacct_gather/linux` (cgroup untried) in
slurm.conf and works without slurmdbd (sstat asks the nodes' slurmstepd through slurmd). One line
per running step (`42.batch`, `42.0`, `42.extern`...); a job's CPU is the sum over its steps of
`TRESUsageInTot`'s `cpu=` (all tasks of the step: for `srun -n2`, AveCPU 00:00:04 and NTasks 2 read
`cpu=00:00:08`), else AveCPU x NTasks. `TotalCPU`, `UserCPU` and `SystemCPU` are sacct-only
("Invalid field requested"). Resolution one second, sampled every JobAcctGatherFrequency.
sstat exits 0 in all of these (measured), so stderr decides:
- `No steps running for job N` (pending, or between steps): the controller answered; N absent.
- `couldn't get steps for job N`: N is unknown to the controller (finished, purged) -- OR the
  controller is unreachable (a stopped slurmctld or a wrong port print exactly this). So when no
  asked job got an answer and all say so, that is a BatchError, not "all gone".
- `problem getting step_layout for StepId=N.batch: Communication connection failure` (slurmd
  down): N is left out (its sum would be short); with nothing answered at all, a BatchError.
- `sstat: fatal: ...`, `Unable to process configuration file`: exit 1, BatchError.
- `JobAcctGatherType=jobacct_gather/none`: `42.batch||213503982334-14:25:51|0` (NTasks 0, no
  TRES, AveCPU NO_VAL). A step's first look before its first sample can read the same, so it is
  no error: that job is absent (unknown), every time when nothing is gathered.

Errors (Slurm 22.05.8, measured):
- `squeue -j ID -t all` for a job the controller has purged (older than MinJobAge): exit 1,
  `slurm_load_jobs error: Invalid job id specified` -> the job is gone.
- controller down: exit 1, `slurm_load_jobs error: Unable to contact slurm controller (connect
  failure)` -> BatchError. So is any other failure, and a timeout.
- `scancel` of a finished or unknown job: exit 0 and silent on 22.05; older/newer versions print
  `Job/step already completing or completed` or `Invalid job id specified` with a non-zero
  exit -> success. Anything else (e.g. `Access/permission denied`, exit 210) -> BatchError.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, tzinfo

from reaper.batch.base import BatchError, CommandRunner, Job, JobState, parse_cpu_seconds
from reaper.units import parse_gres, parse_memory_mb

__all__ = [
    "SSTAT_FORMAT", "SlurmBatch", "parse_gpus", "parse_mem_mb", "parse_slurm_time", "parse_squeue", "parse_sstat",
]

# (squeue --Format field, our key). The name stays last.
FIELDS: tuple[tuple[str, str], ...] = (
    ("JobID", "id"),
    ("UserName", "user"),
    ("State", "state"),
    ("Partition", "partition"),
    ("BatchHost", "batch_host"),
    ("NodeList", "nodes"),
    ("NumNodes", "num_nodes"),
    ("NumTasks", "num_tasks"),
    ("NumCPUs", "cpus"),
    ("MinMemory", "min_memory"),
    ("tres-alloc", "tres_alloc"),
    ("tres-per-job", "tres_per_job"),
    ("tres-per-node", "tres_per_node"),
    ("tres-per-task", "tres_per_task"),
    ("StartTime", "start"),
    ("EndTime", "end"),
    ("Name", "name"),
)
FORMAT = ",".join(f"{f}:0|" for f, _ in FIELDS[:-1]) + f",{FIELDS[-1][0]}:0"

_STATE_MAP = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "SUSPENDED": JobState.SUSPENDED,
    "STOPPED": JobState.SUSPENDED,
    "COMPLETING": JobState.COMPLETING,
    "COMPLETED": JobState.COMPLETED,
    "CANCELLED": JobState.CANCELLED,
    "FAILED": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "DEADLINE": JobState.TIMEOUT,
    "TIMEOUT": JobState.TIMEOUT,
    "PREEMPTED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "SPECIAL_EXIT": JobState.FAILED,
}

_GONE_QUERY = re.compile(r"Invalid job id specified", re.I)
_GONE_CANCEL = re.compile(
    r"Invalid job id specified|already completing or completed|Job has already finished", re.I
)
_JOB_ID = re.compile(r"^\d+(?:[_+]\d+)?$")
_NONE = {"", "N/A", "NONE", "(null)", "UNKNOWN", "UNLIMITED", "INVALID"}


def parse_slurm_time(value: str, tz: tzinfo | None = None) -> datetime | None:
    """`2026-11-25T21:23:44` (Slurm's local time, no zone) -> aware UTC datetime; N/A -> None."""
    value = value.strip()
    if value.upper() in _NONE:
        return None
    try:
        naive = datetime.strptime(value, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None
    aware = naive.replace(tzinfo=tz) if tz is not None else naive.astimezone()
    return aware.astimezone(UTC)


def parse_mem_mb(value: str) -> int | None:
    """`16000M`, `4G`, `512K`, `1000` (MB) -> whole MB (reaper.units.parse_memory_mb); `0`/N/A -> None."""
    mb = parse_memory_mb(value)
    return (int(round(mb)) or None) if mb is not None else None


def _gpu_count(tres: str) -> int | None:
    """GPUs in a TRES string (reaper.units.parse_gres): `gres/gpu=2`, `gres:gpu:a100:2`, ..."""
    gres = parse_gres(tres)
    return gres[0] if gres is not None else None


def _int(value: str) -> int | None:
    try:
        return int(value.strip())
    except ValueError:
        return None


def parse_gpus(row: Mapping[str, str]) -> int:
    alloc = _gpu_count(row.get("tres_alloc", ""))
    if alloc is not None:
        return alloc
    per_job = _gpu_count(row.get("tres_per_job", ""))
    if per_job is not None:
        return per_job
    per_node = _gpu_count(row.get("tres_per_node", ""))
    if per_node is not None:
        return per_node * max(1, _int(row.get("num_nodes", "")) or 1)
    per_task = _gpu_count(row.get("tres_per_task", ""))
    if per_task is not None:
        return per_task * max(1, _int(row.get("num_tasks", "")) or 1)
    return 0


def _row_to_job(row: Mapping[str, str], tz: tzinfo | None) -> Job:
    raw_state = row["state"].strip().split()[0].rstrip("+") if row["state"].strip() else ""
    state = _STATE_MAP.get(raw_state.upper(), JobState.OTHER)
    node = row.get("batch_host", "").strip()
    if node.upper() in _NONE:
        node = ""
    if not node:
        nodes = row.get("nodes", "").strip()
        node = "" if nodes.upper() in _NONE else nodes
    mem = None
    m = re.search(r"(?:^|,)mem=([^,]+)", row.get("tres_alloc", ""))
    if m:
        mem = parse_mem_mb(m.group(1))
    if mem is None:
        mem = parse_mem_mb(row.get("min_memory", ""))
    pending = state is JobState.PENDING
    return Job(
        id=row["id"].strip(),
        user=row["user"].strip(),
        name=row["name"].strip(),
        state=state,
        partition=row.get("partition", "").strip() or None,
        node=None if pending else (node or None),
        gpus=parse_gpus(row),
        cpus=_int(row.get("cpus", "")) or 0,
        mem_mb=mem,
        start=None if pending else parse_slurm_time(row.get("start", ""), tz),
        end=None if pending else parse_slurm_time(row.get("end", ""), tz),
        raw_state=raw_state,
    )


def parse_squeue(stdout: str, tz: tzinfo | None = None) -> list[Job]:
    """Parse the output of `squeue --noheader --Format=<FORMAT>`."""
    jobs = []
    keys = [k for _, k in FIELDS]
    for line in stdout.splitlines():
        if not line.strip():
            continue
        parts = line.split("|", len(keys) - 1)
        if len(parts) != len(keys):
            raise BatchError(f"cannot read squeue line ({len(parts)} fields, want {len(keys)}): {line!r}")
        jobs.append(_row_to_job(dict(zip(keys, parts, strict=True)), tz))
    return jobs


SSTAT_FORMAT = "JobID,TRESUsageInTot,AveCPU,NTasks"
_STEP_ID = re.compile(r"^(?P<job>\d+(?:[_+]\d+)?)(?:\.(?P<step>[\w-]+))?$")
_TRES_CPU = re.compile(r"(?:^|,)cpu=([^,]*)")


def _step_cpu(tres: str, ave: str, ntasks: str, line: str) -> float | None:
    """One step's CPU seconds: TRESUsageInTot's cpu= (all tasks), else AveCPU x NTasks; None:
    the step printed no figure (just started, or not gathered: NTasks 0)."""
    m = _TRES_CPU.search(tres.strip())
    if m and m.group(1).strip():
        value = parse_cpu_seconds(m.group(1))
        if value is None:
            raise BatchError(f"cannot read the cpu= of TRESUsageInTot in sstat line {line!r}")
        return value
    tasks = _int(ntasks) if ntasks.strip() else 1
    if tasks is None or tasks < 0:
        raise BatchError(f"cannot read NTasks in sstat line {line!r}")
    if not ave.strip() or tasks == 0:
        # NTasks 0 (with AveCPU a huge NO_VAL): not sampled yet, or jobacct_gather/none (measured)
        return None
    value = parse_cpu_seconds(ave)
    if value is None:
        raise BatchError(f"cannot read AveCPU in sstat line {line!r}")
    return value * tasks


def _parse_sstat(stdout: str) -> tuple[dict[str, float], set[str]]:
    total: dict[str, float] = {}
    short: set[str] = set()
    for line in stdout.splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != 4:
            raise BatchError(f"cannot read sstat line ({len(parts)} fields, want 4): {line!r}")
        step, tres, ave, ntasks = parts
        m = _STEP_ID.match(step.strip())
        if m is None:
            raise BatchError(f"not a Slurm step id in sstat line: {line!r}")
        job = m.group("job")
        cpu = _step_cpu(tres, ave, ntasks, line)
        if cpu is None:
            short.add(job)
            continue
        total[job] = total.get(job, 0.0) + cpu
    return {job: cpu for job, cpu in total.items() if job not in short}, short


def parse_sstat(stdout: str) -> dict[str, float]:
    """CPU seconds by job id, summed over the job's steps, from the output of
    `sstat -a -j IDS --noheader -P --format=SSTAT_FORMAT`. A job with a step that printed no
    figure is left out (its sum would be short). A line of another shape raises BatchError."""
    return _parse_sstat(stdout)[0]


_NO_STEPS = re.compile(r"No steps running for job (\d+(?:[_+]\d+)?)")
_NO_JOB = re.compile(r"couldn't get steps for job (\d+(?:[_+]\d+)?)")
_NAMED = re.compile(r"(?:StepId=|job |step )(\d+(?:[_+]\d+)?)")


def _sstat_stderr(stderr: str) -> tuple[set[str], set[str], set[str], list[str]]:
    """(jobs with no steps, jobs the controller did not give, jobs named in another error,
    error lines that name no job)."""
    no_steps: set[str] = set()
    no_job: set[str] = set()
    doubtful: set[str] = set()
    other: list[str] = []
    for line in stderr.splitlines():
        if not line.strip():
            continue
        if m := _NO_STEPS.search(line):
            no_steps.add(m.group(1))
        elif m := _NO_JOB.search(line):
            no_job.add(m.group(1))
        elif named := _NAMED.findall(line):
            doubtful.update(named)
        else:
            other.append(line.strip())
    return no_steps, no_job, doubtful, other


class SlurmBatch:
    """`BatchSystem` for Slurm.

    squeue/scancel/sstat: command paths (or names on PATH). prefix: e.g. "sudo -n -u {username}",
    "runuser -u {username} --" or "" — used for `cancel(..., user=...)` only when set.
    env: extra environment for the commands (SLURM_CONF). timeout: seconds per command.
    tz: the zone Slurm prints times in (None: this process's local zone).
    """

    def __init__(
        self,
        *,
        squeue: str = "squeue",
        scancel: str = "scancel",
        sstat: str = "sstat",
        prefix: str = "",
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        tz: tzinfo | None = None,
    ) -> None:
        self.squeue = squeue
        self.scancel = scancel
        self.sstat = sstat
        self.tz = tz
        self.runner = CommandRunner(timeout=timeout, prefix=prefix, env=env)

    async def jobs(self, *, name: str | None = None, user: str | None = None) -> list[Job]:
        cmd = [self.squeue, "--noheader", f"--Format={FORMAT}"]
        if name is not None:
            cmd.append(f"--name={name}")
        res = await self.runner.run(cmd)
        if res.returncode != 0:
            raise BatchError(
                f"squeue failed (exit {res.returncode}): {res.stderr.strip()}",
                command=res.argv,
                stderr=res.stderr,
                returncode=res.returncode,
            )
        jobs = parse_squeue(res.stdout, self.tz)
        # Filter here too: names are matched exactly, and an unknown user is no error.
        return [
            j
            for j in jobs
            if not j.finished and (name is None or j.name == name) and (user is None or j.user == user)
        ]

    async def job(self, job_id: str) -> Job | None:
        job_id = str(job_id).strip()
        if not _JOB_ID.match(job_id):
            raise BatchError(f"not a Slurm job id: {job_id!r}")
        cmd = [self.squeue, "--noheader", "-t", "all", "-j", job_id, f"--Format={FORMAT}"]
        res = await self.runner.run(cmd)
        if res.returncode != 0:
            if _GONE_QUERY.search(res.stderr) and "error" in res.stderr.lower() and not _doubt(res.stderr):
                return None
            raise BatchError(
                f"squeue -j {job_id} failed (exit {res.returncode}): {res.stderr.strip()}",
                command=res.argv,
                stderr=res.stderr,
                returncode=res.returncode,
            )
        jobs = parse_squeue(res.stdout, self.tz)
        mine = [j for j in jobs if j.id == job_id]
        if not mine:
            # squeue answered (exit 0) and does not list it: the controller no longer knows it.
            return None
        job = mine[0]
        return None if job.finished else job

    async def cancel(self, job_id: str, *, user: str | None = None) -> None:
        job_id = str(job_id).strip()
        if not _JOB_ID.match(job_id):
            raise BatchError(f"not a Slurm job id: {job_id!r}")
        res = await self.runner.run([self.scancel, job_id], username=user)
        if res.returncode == 0:
            return
        if _GONE_CANCEL.search(res.stderr) and not _doubt(res.stderr):
            return
        raise BatchError(
            f"scancel {job_id} failed (exit {res.returncode}): {res.stderr.strip()}",
            command=res.argv,
            stderr=res.stderr,
            returncode=res.returncode,
        )

    async def cpu_usage(self, job_ids: Sequence[str]) -> dict[str, float]:
        """CPU seconds each job has used so far (BatchSystem.cpu_usage), from one sstat for all."""
        asked = list(dict.fromkeys(str(j).strip() for j in job_ids))
        if not asked:
            return {}
        bad = [j for j in asked if not _JOB_ID.match(j)]
        if bad:
            raise BatchError(f"not a Slurm job id: {bad[0]!r}")
        cmd = [self.sstat, "-a", "-j", ",".join(asked), "--noheader", "-P", f"--format={SSTAT_FORMAT}"]
        res = await self.runner.run(cmd)
        err = res.stderr.strip()
        if res.returncode != 0:
            raise BatchError(
                f"sstat failed (exit {res.returncode}): {err}",
                command=res.argv, stderr=res.stderr, returncode=res.returncode,
            )
        try:
            cpu = parse_sstat(res.stdout)
        except BatchError as e:
            raise BatchError(str(e), command=res.argv, stderr=res.stderr, returncode=0) from None
        no_steps, no_job, doubtful, other = _sstat_stderr(res.stderr)
        answered = {j for j in asked if j in cpu}
        if not answered and not no_steps and (doubtful or other or no_job):
            # Nothing came back that proves the controller and nodes were asked: "couldn't get
            # steps" for every job is also what an unreachable slurmctld prints (exit 0).
            raise BatchError(
                f"sstat answered for none of the {len(asked)} jobs (slurmctld or slurmd unreachable, "
                f"or all ended): {err or 'no output'}",
                command=res.argv, stderr=res.stderr, returncode=0,
            )
        if other and not doubtful:
            raise BatchError(
                f"sstat printed an error naming no job, so any figure may be short: {other[0]}",
                command=res.argv, stderr=res.stderr, returncode=0,
            )
        return {j: cpu[j] for j in asked if j in cpu and j not in doubtful}


_DOUBT = re.compile(
    r"Unable to contact|timed out|connect failure|Socket|Unable to process configuration", re.I
)


def _doubt(stderr: str) -> bool:
    """Messages that mean "could not ask", even when mixed with a not-found line."""
    return bool(_DOUBT.search(stderr))
