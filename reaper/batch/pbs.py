"""PBS Professional / OpenPBS and Torque over the command line: `qstat` to list, `qdel` to cancel.

Three output formats, chosen with `format` (or "auto": json, else xml, else text; see PbsBatch):
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
- "text": the classic `qstat -f [ID]` every PBS and Torque prints (text_records has the layout):
  `Job Id: 123.server` blocks of `    key = value` lines, long values wrapped onto tab-indented
  lines; times in ctime format, local. Start: `stime` (PBS Pro) or `start_time` (Torque).
  Debian's slurm-wlm-torque wrapper (Perl over Slurm) prints it too, with tabs for indents, no
  start time, no resources_used, `euser = name(uid)`, Slurm's unlimited walltime as
  71582788:15:00 (read as no limit), and `C` for every ended job; it has no -F and no -x; for an
  unknown id and for an empty listing alike it exits 153 printing nothing (read as "none"), and
  its qdel exits 1 silently for a gone job (success once qstat confirms it) and prints its errors
  ("Access/permission denied") on stdout.

All three are read into one flat shape (`Resource_List.walltime`, `resources_used.cput`, ...).
CPUs: the largest of Resource_List.ncpus, procs and the nodes spec (Torque prints ncpus = 1 beside
nodes=1:ppn=4). CPU accounting: `resources_used.cput` (cpu_usage), from one listing of all jobs.

Gone (None / success): `qstat: Unknown Job Id ...` (exit 153; Torque adds "Error"),
`... Job has finished, use -x or -H ...` (PBS Pro, exit 35), state F/C/X; for qdel also
"Unknown Job Id", "Job has finished" and Torque's "invalid state for job - COMPLETE".
Anything else is a BatchError.
"""

from __future__ import annotations

import contextlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from reaper.batch.base import BatchError, CommandResult, CommandRunner, Job, JobState, parse_cpu_seconds

__all__ = ["PbsBatch", "parse_pbs_json", "parse_qstat_text", "parse_torque_xml", "pbs_cpu_seconds"]

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
_DOUBT = re.compile(
    r"cannot connect|Connection refused|timed out|communication failure|pbs_connect|Unable to contact"
    r"|Problem loading", re.I)
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
    try:
        return timedelta(days=d, hours=h, minutes=m, seconds=s)
    except OverflowError:  # beyond any real limit: none
        return None


def _first_host(exec_host: Any) -> str | None:
    if not exec_host:
        return None
    return str(exec_host).split("+")[0].split("/")[0].split(":")[0].strip("( ") or None


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _ctime(value: Any, tz: tzinfo | None) -> datetime | None:
    """PBS Pro's 'Wed Jul 15 11:52:48 2020' (local time) -> UTC; epoch seconds (Torque XML) too."""
    if not value:
        return None
    epoch = _int(value)
    if epoch is not None:
        try:
            return datetime.fromtimestamp(epoch, UTC) if epoch > 0 else None
        except (OverflowError, OSError, ValueError):
            return None
    try:
        naive = datetime.strptime(" ".join(str(value).split()), "%a %b %d %H:%M:%S %Y")
    except ValueError:
        return None
    aware = naive.replace(tzinfo=tz) if tz is not None else naive.astimezone()
    return aware.astimezone(UTC)


# A walltime this long means "no limit" (slurm-wlm-torque prints Slurm's INFINITE as 71582788:15:00).
_UNLIMITED = timedelta(days=365 * 100)


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


def _record_to_job(job_id: str, attrs: Mapping[str, Any], tz: tzinfo | None) -> Job:
    """One job from its attributes, flat: `job_state`, `Resource_List.walltime`, ... (every format
    is read into this shape)."""
    def res(key: str) -> Any:
        return attrs.get(f"Resource_List.{key}")

    raw = str(attrs.get("job_state", "")).strip()
    state = _STATES.get(raw.upper(), JobState.OTHER)
    # euser is "alice" (PBS Pro, Torque) or "alice(1001)" (slurm-wlm-torque); Job_Owner "alice@host".
    owner = str(attrs.get("euser") or attrs.get("Job_Owner") or "").split("@")[0].split("(")[0].strip()
    pending = state is JobState.PENDING
    node_cpus, node_gpus = _nodes_spec(str(res("nodes"))) if res("nodes") else (0, 0)
    cpus = max(_int(res("ncpus")) or 0, _int(res("procs")) or 0, node_cpus)
    gpus = _int(res("ngpus")) or _int(res("gpus")) or node_gpus
    wall = _walltime(res("walltime"))
    start = None if pending else _ctime(attrs.get("stime") or attrs.get("start_time"), tz)
    end = None
    if start is not None and wall is not None and timedelta(0) <= wall < _UNLIMITED:
        with contextlib.suppress(OverflowError):
            end = start + wall
    return Job(
        id=job_id,
        user=owner,
        name=str(attrs.get("Job_Name", "")),
        state=state,
        partition=str(attrs.get("queue") or "") or None,
        node=None if pending else _first_host(attrs.get("exec_host")),
        gpus=gpus,
        cpus=cpus,
        mem_mb=_mem_mb(res("mem")),
        start=start,
        end=end,
        raw_state=raw,
    )


Records = list[tuple[str, dict[str, Any]]]


def json_records(stdout: str) -> Records:
    """(job id, flat attributes) of PBS Pro's `qstat -f -F json` output."""
    try:
        data = json.loads(stdout)
    except (json.JSONDecodeError, RecursionError) as e:
        raise BatchError(f"qstat printed no valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise BatchError("qstat JSON is not an object")
    jobs = data.get("Jobs", {})
    if not isinstance(jobs, dict):
        raise BatchError("qstat JSON: 'Jobs' is not an object")
    out: Records = []
    for job_id, attrs in jobs.items():
        if not isinstance(attrs, dict):
            raise BatchError(f"qstat JSON: job {job_id} is not an object")
        flat: dict[str, Any] = {}
        for key, value in attrs.items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        out.append((str(job_id), flat))
    return out


def xml_records(stdout: str) -> Records:
    """(job id, flat attributes) of Torque's `qstat -x` output."""
    if not stdout.strip():
        return []
    try:
        root = ET.fromstring(stdout)
    except (ET.ParseError, RecursionError) as e:
        raise BatchError(f"qstat printed no valid XML: {e}") from e
    out: Records = []
    for el in root.iter("Job"):
        flat: dict[str, Any] = {}
        for child in el:
            if len(child) == 0:
                flat[child.tag] = child.text or ""
            else:
                flat.update({f"{child.tag}.{sub.tag}": sub.text or "" for sub in child})
        job_id = str(flat.get("Job_Id") or "")
        if not job_id:
            raise BatchError("qstat XML: a Job without Job_Id")
        out.append((job_id, flat))
    return out


_JOB_HEAD = re.compile(r"^Job Id:\s*(\S+)\s*$")
_ATTR = re.compile(r"^(?P<indent>[ \t]+)(?P<key>[A-Za-z_][\w.-]*) = ?(?P<value>.*)$")


def text_records(stdout: str) -> Records:
    """(job id, flat attributes) of the classic `qstat -f` text (PBS Pro, OpenPBS, Torque, and
    Slurm's slurm-wlm-torque wrapper):

        Job Id: 123.server            (the wrapper: "Job Id:<TAB>123")
            Job_Name = nb             (4 spaces; the wrapper: a tab)
            Variable_List = PBS_O_HOME=/home/a,PBS_O_PATH=/usr/bin:/b
        <TAB>in:/usr/local/bin        (a long value wraps onto lines with another indent)

    Blocks are separated by blank lines. An attribute line has the block's first attribute's
    indent and `key = value`; other indented lines continue the value before them. Anything
    else (text outside a block, a continuation with nothing to continue) raises BatchError."""
    out: Records = []
    attrs: dict[str, Any] | None = None
    indent: str | None = None
    key: str | None = None
    for n, line in enumerate(stdout.splitlines(), 1):
        if not line.strip():
            key = None if attrs is None else key
            continue
        head = _JOB_HEAD.match(line)
        if head:
            attrs, indent, key = {}, None, None
            out.append((head.group(1), attrs))
            continue
        if attrs is None or not line[:1].isspace():
            raise BatchError(f"cannot read qstat -f line {n} (not in a 'Job Id:' block): {line[:120]!r}")
        m = _ATTR.match(line)
        if m and (indent is None or m.group("indent") == indent):
            indent = m.group("indent")
            key = m.group("key")
            attrs[key] = m.group("value").strip()
        elif key is not None:
            attrs[key] = str(attrs[key]) + line.strip()
        else:
            raise BatchError(f"cannot read qstat -f line {n} (no attribute to continue): {line[:120]!r}")
    return out


def parse_pbs_json(stdout: str, tz: tzinfo | None = None) -> list[Job]:
    """Jobs in PBS Pro's `qstat -f -F json` output."""
    return [_record_to_job(i, a, tz) for i, a in json_records(stdout)]


def parse_torque_xml(stdout: str, tz: tzinfo | None = None) -> list[Job]:
    """Jobs in Torque's `qstat -x` output."""
    return [_record_to_job(i, a, tz) for i, a in xml_records(stdout)]


def parse_qstat_text(stdout: str, tz: tzinfo | None = None) -> list[Job]:
    """Jobs in the classic `qstat -f` text (see text_records). Times are local (`tz`)."""
    return [_record_to_job(i, a, tz) for i, a in text_records(stdout)]


def pbs_cpu_seconds(records: Records) -> dict[str, float]:
    """`resources_used.cput` by job id, for jobs not finished; a job without one is absent.
    A cput that is not a time raises BatchError."""
    out: dict[str, float] = {}
    for job_id, attrs in records:
        if _STATES.get(str(attrs.get("job_state", "")).strip().upper()) in (JobState.COMPLETED,):
            continue
        raw = attrs.get("resources_used.cput")
        if raw is None or str(raw).strip() == "":
            continue
        value = parse_cpu_seconds(str(raw))
        if value is None:
            raise BatchError(f"qstat: job {job_id} has resources_used.cput {str(raw)[:40]!r}, not a CPU time")
        out[job_id] = value
    return out


_READERS = {"json": json_records, "xml": xml_records, "text": text_records}
_COMMANDS = {"json": ["-f", "-F", "json"], "xml": ["-x"], "text": ["-f"]}
# qstat refusing the option (Torque has no -F, the Slurm wrappers neither -F nor -x): auto moves on.
_REFUSED = re.compile(r"unknown option|invalid option|illegal option|unrecognized option|usage:", re.I)


def _same_id(asked: str, listed: str) -> bool:
    """'123' matches '123.server'; '123.server' matches '123.server.domain'."""
    return listed == asked or listed.startswith(asked + ".") or asked.startswith(listed + ".")


class PbsBatch:
    """`BatchSystem` for PBS Pro/OpenPBS (format="json"), Torque (format="xml"), the classic
    `qstat -f` text of any of them and of Slurm's slurm-wlm-torque wrappers (format="text"), or
    "auto": json, else xml, else text -- it moves to the next when qstat refuses the option
    (exit != 0 with "Unknown option"/"invalid option"/a usage text) and keeps the one that worked.
    """

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
        if format not in ("json", "xml", "text", "auto"):
            raise ValueError("format must be 'json' (PBS Pro), 'xml' (Torque), 'text' (qstat -f) or 'auto'")
        self.qstat = qstat
        self.qdel = qdel
        self.tz = tz
        self.format = format
        self._formats: list[str] = ["json", "xml", "text"] if format == "auto" else [format]
        self.runner = CommandRunner(timeout=timeout, prefix=prefix, env=env)

    @staticmethod
    def _error(what: str, res: CommandResult) -> BatchError:
        # slurm-wlm-torque's qdel prints its errors on stdout
        said = res.stderr.strip() or res.stdout.strip()[:500]
        return BatchError(
            f"{what} failed (exit {res.returncode}): {said}",
            command=res.argv,
            stderr=res.stderr or res.stdout,
            returncode=res.returncode,
        )

    async def _qstat(self, job_id: str | None) -> tuple[CommandResult, str]:
        """Run qstat in the format in use (auto: the first the command accepts)."""
        while True:
            fmt = self._formats[0]
            cmd = [self.qstat, *_COMMANDS[fmt], *([job_id] if job_id else [])]
            res = await self.runner.run(cmd)
            if res.returncode != 0 and len(self._formats) > 1 and _REFUSED.search(res.stderr) \
                    and not _DOUBT.search(res.stderr):
                self._formats.pop(0)  # this qstat has no such option: the next format, for good
                continue
            return res, fmt

    def _records(self, res: CommandResult, fmt: str) -> Records:
        try:
            return _READERS[fmt](res.stdout)
        except BatchError as e:
            raise BatchError(str(e), command=res.argv, stderr=res.stderr, returncode=res.returncode) from None

    @staticmethod
    def _nothing_found(res: CommandResult) -> bool:
        """Exit 153 (PBSE_UNKJOBID) with nothing printed: slurm-wlm-torque's qstat says so for an
        unknown id and for an empty listing alike; real PBS/Torque add "Unknown Job Id"."""
        return res.returncode == 153 and not res.stdout.strip() and not _DOUBT.search(res.stderr) \
            and (not res.stderr.strip() or bool(_GONE_QSTAT.search(res.stderr)))

    async def _all(self) -> Records:
        res, fmt = await self._qstat(None)
        if res.returncode != 0:
            if self._nothing_found(res):
                return []
            raise self._error("qstat", res)
        return self._records(res, fmt)

    async def jobs(self, *, name: str | None = None, user: str | None = None) -> list[Job]:
        return [
            j
            for j in (_record_to_job(i, a, self.tz) for i, a in await self._all())
            if not j.finished and (name is None or j.name == name) and (user is None or j.user == user)
        ]

    async def job(self, job_id: str) -> Job | None:
        job_id = str(job_id).strip()
        if not _JOB_ID.match(job_id):
            raise BatchError(f"not a PBS job id: {job_id!r}")
        res, fmt = await self._qstat(job_id)
        if res.returncode != 0:
            if (_GONE_QSTAT.search(res.stderr) and not _DOUBT.search(res.stderr)) or self._nothing_found(res):
                return None
            raise self._error(f"qstat {job_id}", res)
        mine = [_record_to_job(i, a, self.tz) for i, a in self._records(res, fmt) if _same_id(job_id, i)]
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
        said = res.stderr + res.stdout
        if _GONE_QDEL.search(said) and not _DOUBT.search(said):
            return
        if not said.strip():
            # slurm-wlm-torque's qdel of a finished or unknown job: exit 1, silent. Gone only if
            # qstat positively says so (a BatchError from it is doubt: the qdel error stands).
            try:
                if await self.job(job_id) is None:
                    return
            except BatchError:
                pass
        raise self._error(f"qdel {job_id}", res)

    async def cpu_usage(self, job_ids: Sequence[str]) -> dict[str, float]:
        """`resources_used.cput` of each job (BatchSystem.cpu_usage), from one qstat listing of all
        jobs (unknown ids make qstat fail, a listing does not). Ids match as in job():
        '123' is '123.server'. Jobs that are finished or have no cput yet are absent."""
        asked = list(dict.fromkeys(str(j).strip() for j in job_ids))
        if not asked:
            return {}
        bad = [j for j in asked if not _JOB_ID.match(j)]
        if bad:
            raise BatchError(f"not a PBS job id: {bad[0]!r}")
        used = pbs_cpu_seconds(await self._all())
        out: dict[str, float] = {}
        for want in asked:
            for listed, cpu in used.items():
                if _same_id(want, listed):
                    out[want] = cpu
                    break
        return out
