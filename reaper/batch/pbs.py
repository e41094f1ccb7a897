"""PBS Professional / OpenPBS and Torque over the command line: `qstat` to list, `qdel` to cancel.

Two documented output formats, chosen with `format`:
- "json" (PBS Pro 18+ / OpenPBS): `qstat -f -F json [ID]` ->
  `{"timestamp":..., "pbs_version":..., "pbs_server":..., "Jobs": {"123.server": {"Job_Name",
  "Job_Owner": "user@host", "job_state": "R", "queue", "exec_host": "node1/0*2+node2/0*2",
  "Resource_List": {"ncpus", "ngpus", "mem": "4gb", "walltime": "01:00:00", ...},
  "stime": "Wed Jul 15 11:52:48 2020", ...}}}` ("Jobs" is absent when no job matches).
  Times are local time without zone (ctime format).
- "xml" (Torque 4+ / PBS classic): `qstat -x [ID]` -> `<Data><Job><Job_Id>123.host</Job_Id>
  <Job_Name/><Job_Owner>user@host</Job_Owner><job_state>R</job_state><queue/><exec_host>
  node1/0-1+node2/0</exec_host><Resource_List><nodes>1:ppn=2:gpus=1</nodes><mem>4gb</mem>
  <walltime>01:00:00</walltime></Resource_List><start_time>1594828373</start_time></Job></Data>`.
  start_time is epoch seconds; finished jobs stay listed in state C for keep_completed seconds.

Gone (None / success): `qstat: Unknown Job Id ...` (exit 153; Torque adds "Error"),
`... Job has finished, use -x or -H ...` (PBS Pro, exit 35), state F/C/X; for qdel also
"Unknown Job Id", "Job has finished" and Torque's "invalid state for job - COMPLETE".
Anything else is a BatchError.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from reaper.batch.base import BatchError, CommandResult, CommandRunner, Job, JobState

__all__ = ["PbsBatch", "parse_pbs_json", "parse_torque_xml"]

_STATES = {
    "Q": JobState.PENDING,
    "H": JobState.PENDING,
    "W": JobState.PENDING,
    "T": JobState.PENDING,  # being moved
    "M": JobState.PENDING,
    "B": JobState.RUNNING,  # array job with running subjobs
    "R": JobState.RUNNING,
    "U": JobState.SUSPENDED,
    "S": JobState.SUSPENDED,
    "E": JobState.COMPLETING,  # exiting: still holds its nodes
    "F": JobState.COMPLETED,
    "X": JobState.COMPLETED,
    "C": JobState.COMPLETED,
}

_GONE_QSTAT = re.compile(r"Unknown Job Id|Job has finished", re.I)
_GONE_QDEL = re.compile(r"Unknown Job Id|Job has finished|invalid state for job - COMPLETE", re.I)
_DOUBT = re.compile(r"cannot connect|Connection refused|timed out|communication failure|pbs_connect", re.I)
_JOB_ID = re.compile(r"^[\w.\[\]-]+$")


def _mem_mb(value: Any) -> int | None:
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtp]?)(b|w)?\s*", str(value), re.I)
    if not m:
        return None
    n = int(m.group(1))
    unit = m.group(2).lower()
    factor = {"": 1 / (1024 * 1024), "k": 1 / 1024, "m": 1, "g": 1024, "t": 1024**2, "p": 1024**3}[unit]
    if (m.group(3) or "b").lower() == "w":
        factor *= 8
    return int(round(n * factor)) or None


def _walltime(value: Any) -> timedelta | None:
    if value in (None, ""):
        return None
    parts = str(value).split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        return None
    while len(nums) < 3:
        nums.insert(0, 0)
    h, m, s = nums[-3], nums[-2], nums[-1]
    d = nums[-4] if len(nums) >= 4 else 0
    return timedelta(days=d, hours=h, minutes=m, seconds=s)


def _first_host(exec_host: Any) -> str | None:
    if not exec_host:
        return None
    return str(exec_host).split("+")[0].split("/")[0].split(":")[0] or None


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _ctime(value: Any, tz: tzinfo | None) -> datetime | None:
    """PBS Pro's 'Wed Jul 15 11:52:48 2020' (local time) -> UTC."""
    if not value:
        return None
    try:
        naive = datetime.strptime(" ".join(str(value).split()), "%a %b %d %H:%M:%S %Y")
    except ValueError:
        return None
    aware = naive.replace(tzinfo=tz) if tz is not None else naive.astimezone()
    return aware.astimezone(UTC)


def _job(
    job_id: str,
    attrs: Mapping[str, Any],
    resources: Mapping[str, Any],
    start: datetime | None,
    gpus: int,
    cpus: int,
) -> Job:
    raw = str(attrs.get("job_state", "")).strip()
    state = _STATES.get(raw.upper(), JobState.OTHER)
    owner = str(attrs.get("euser") or attrs.get("Job_Owner") or "").split("@")[0]
    pending = state is JobState.PENDING
    wall = _walltime(resources.get("walltime"))
    start = None if pending else start
    return Job(
        id=job_id,
        user=owner,
        name=str(attrs.get("Job_Name", "")),
        state=state,
        partition=str(attrs.get("queue") or "") or None,
        node=None if pending else _first_host(attrs.get("exec_host")),
        gpus=gpus,
        cpus=cpus,
        mem_mb=_mem_mb(resources.get("mem")),
        start=start,
        end=start + wall if start is not None and wall is not None else None,
        raw_state=raw,
    )


def parse_pbs_json(stdout: str, tz: tzinfo | None = None) -> list[Job]:
    """Jobs in PBS Pro's `qstat -f -F json` output."""
    try:
        data = json.loads(stdout)
    except json.JSONDecodeError as e:
        raise BatchError(f"qstat printed no valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise BatchError("qstat JSON is not an object")
    jobs = data.get("Jobs", {})
    if not isinstance(jobs, dict):
        raise BatchError("qstat JSON: 'Jobs' is not an object")
    out = []
    for job_id, attrs in jobs.items():
        if not isinstance(attrs, dict):
            raise BatchError(f"qstat JSON: job {job_id} is not an object")
        res = attrs.get("Resource_List") or {}
        gpus = _int(res.get("ngpus")) or 0
        cpus = _int(res.get("ncpus")) or 0
        out.append(_job(str(job_id), attrs, res, _ctime(attrs.get("stime"), tz), gpus, cpus))
    return out


def _nodes_spec(spec: str) -> tuple[int, int]:
    """Torque `nodes=2:ppn=4:gpus=1+1:ppn=2` -> (cpus, gpus)."""
    cpus = gpus = 0
    for chunk in spec.split("+"):
        fields = chunk.split(":")
        count = _int(fields[0]) if fields and fields[0].isdigit() else 1
        ppn = 1
        g = 0
        for f in fields[1:]:
            if f.startswith("ppn="):
                ppn = _int(f[4:]) or 1
            elif f.startswith("gpus="):
                g = _int(f[5:]) or 0
        cpus += (count or 1) * ppn
        gpus += (count or 1) * g
    return cpus, gpus


def parse_torque_xml(stdout: str) -> list[Job]:
    """Jobs in Torque's `qstat -x` output."""
    if not stdout.strip():
        return []
    try:
        root = ET.fromstring(stdout)
    except ET.ParseError as e:
        raise BatchError(f"qstat printed no valid XML: {e}") from e
    out = []
    for el in root.iter("Job"):
        attrs = {child.tag: (child.text or "") for child in el if len(child) == 0}
        rl = el.find("Resource_List")
        res = {child.tag: (child.text or "") for child in rl} if rl is not None else {}
        cpus, gpus = _nodes_spec(res["nodes"]) if res.get("nodes") else (0, 0)
        cpus = _int(res.get("procs")) or _int(res.get("ncpus")) or cpus
        gpus = _int(res.get("gpus")) or _int(res.get("ngpus")) or gpus
        epoch = _int(attrs.get("start_time"))
        start = datetime.fromtimestamp(epoch, UTC) if epoch else None
        job_id = attrs.get("Job_Id", "")
        if not job_id:
            raise BatchError("qstat XML: a Job without Job_Id")
        out.append(_job(job_id, attrs, res, start, gpus, cpus))
    return out


def _same_id(asked: str, listed: str) -> bool:
    """'123' matches '123.server'; '123.server' matches '123.server.domain'."""
    return listed == asked or listed.startswith(asked + ".") or asked.startswith(listed + ".")


class PbsBatch:
    """`BatchSystem` for PBS Pro/OpenPBS (format="json") or Torque (format="xml")."""

    def __init__(
        self,
        *,
        qstat: str = "qstat",
        qdel: str = "qdel",
        prefix: str = "",
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        tz: tzinfo | None = None,
        format: str = "json",
    ) -> None:
        if format not in ("json", "xml"):
            raise ValueError("format must be 'json' (PBS Pro) or 'xml' (Torque)")
        self.qstat = qstat
        self.qdel = qdel
        self.tz = tz
        self.format = format
        self.runner = CommandRunner(timeout=timeout, prefix=prefix, env=env)

    def _qstat_cmd(self, job_id: str | None) -> list[str]:
        cmd = [self.qstat, "-f", "-F", "json"] if self.format == "json" else [self.qstat, "-x"]
        return [*cmd, job_id] if job_id else cmd

    def _parse(self, res: CommandResult) -> list[Job]:
        return parse_pbs_json(res.stdout, self.tz) if self.format == "json" else parse_torque_xml(res.stdout)

    @staticmethod
    def _error(what: str, res: CommandResult) -> BatchError:
        return BatchError(
            f"{what} failed (exit {res.returncode}): {res.stderr.strip()}",
            command=res.argv,
            stderr=res.stderr,
            returncode=res.returncode,
        )

    async def jobs(self, *, name: str | None = None, user: str | None = None) -> list[Job]:
        res = await self.runner.run(self._qstat_cmd(None))
        if res.returncode != 0:
            raise self._error("qstat", res)
        return [
            j
            for j in self._parse(res)
            if not j.finished and (name is None or j.name == name) and (user is None or j.user == user)
        ]

    async def job(self, job_id: str) -> Job | None:
        job_id = str(job_id).strip()
        if not _JOB_ID.match(job_id):
            raise BatchError(f"not a PBS job id: {job_id!r}")
        res = await self.runner.run(self._qstat_cmd(job_id))
        if res.returncode != 0:
            if _GONE_QSTAT.search(res.stderr) and not _DOUBT.search(res.stderr):
                return None
            raise self._error(f"qstat {job_id}", res)
        mine = [j for j in self._parse(res) if _same_id(job_id, j.id)]
        if not mine:
            return None  # qstat answered and does not list it
        return None if mine[0].finished else mine[0]

    async def cancel(self, job_id: str, *, user: str | None = None) -> None:
        job_id = str(job_id).strip()
        if not _JOB_ID.match(job_id):
            raise BatchError(f"not a PBS job id: {job_id!r}")
        res = await self.runner.run([self.qdel, job_id], username=user)
        if res.returncode == 0:
            return
        if _GONE_QDEL.search(res.stderr) and not _DOUBT.search(res.stderr):
            return
        raise self._error(f"qdel {job_id}", res)
