"""The PBS Pro / Torque adapter (reaper.batch.pbs) against fake `qstat` and `qdel` executables.

The fakes (tests/adapters/fake_pbs/) are found on PATH, print the documented output formats
(PBS Pro `qstat -f -F json`, Torque `qstat -x` XML, the classic `qstat -f` text of both) and the
documented error messages, for jobs kept in a JSON state file; `qdel` changes that file. Every
behaviour test runs for each format the adapter reads (and `auto`, which finds Torque's XML).
The classic text is also read from recorded outputs (tests/adapters/fake_pbs/recorded/, see its
README); tests/integration/test_slurm_batch.py runs the slurm-wlm-torque wrappers for real.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reaper.batch import BatchError, JobState, make_batch_system
from reaper.batch.pbs import (
    PbsBatch,
    json_records,
    parse_pbs_json,
    parse_qstat_text,
    parse_torque_xml,
    pbs_cpu_seconds,
    text_records,
    xml_records,
)
from tests.harness import require_real_part
from tests.harness.slurm import create_unix_user

FAKE_DIR = Path(__file__).resolve().parent / "fake_pbs"
STIME = 1795640000  # a fixed epoch (2026-11-25)
NAME = "jupyterhub-reaper"


def jobs_state() -> dict:
    return {
        "server": "pbs01",
        "jobs": [
            {"id": "101.pbs01", "name": NAME, "owner": "alice", "state": "R", "queue": "gpu",
             "exec_host": "gn01/0*4+gn02/0*4", "ncpus": 4, "ngpus": 2, "mem": "16gb",
             "walltime": "08:00:00", "stime": STIME, "cput": "01:02:03"},
            {"id": "102.pbs01", "name": NAME, "owner": "bob", "state": "Q", "queue": "cpu",
             "ncpus": 1, "mem": "2048mb", "walltime": "01:30:00"},
            {"id": "103.pbs01", "name": "other-job", "owner": "alice", "state": "R", "queue": "cpu",
             "exec_host": "cn07/3", "ncpus": 1, "stime": STIME, "cput": "00:00:05"},
            {"id": "104.pbs01", "name": NAME, "owner": "carol", "state": "F", "queue": "cpu",
             "exec_host": "cn01/0", "stime": STIME - 3600},
        ],
    }  # fmt: skip


class Fake:
    def __init__(self, folder: Path, flavor: str, format: str) -> None:
        self.folder = folder
        self.flavor = flavor
        self.format = format
        self.state_path = folder / "state.json"
        self.log_path = folder / "calls.log"
        self.extra: dict[str, str] = {}
        state = jobs_state()
        if flavor == "torque":
            for job in state["jobs"]:
                job["state"] = {"F": "C"}.get(job["state"], job["state"])
        self.state_path.write_text(json.dumps(state))
        os.chmod(self.state_path, 0o666)

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{FAKE_DIR}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "FAKE_PBS_STATE": str(self.state_path),
            "FAKE_PBS_FLAVOR": self.flavor,
            "FAKE_PBS_LOG": str(self.log_path),
            **self.extra,
        }

    def batch(self, **kwargs: object) -> PbsBatch:
        return PbsBatch(env=self.env, format=self.format, tz=ZoneInfo("UTC"), **kwargs)  # type: ignore[arg-type]

    def calls(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def state_of(self, job_id: str) -> str:
        return next(j["state"] for j in json.loads(self.state_path.read_text())["jobs"] if j["id"] == job_id)


@pytest.fixture(params=["pbspro-json", "torque-xml", "pbspro-text", "torque-text", "torque-auto"])
def fake(request: pytest.FixtureRequest) -> Iterator[Fake]:
    # A world-readable folder: the runuser-prefix test runs the fakes as another user.
    folder = Path(tempfile.mkdtemp(prefix="fake-pbs-"))
    os.chmod(folder, 0o777)
    flavor, fmt = request.param.split("-")
    try:
        yield Fake(folder, flavor, fmt)
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)


async def test_jobs_lists_the_named_unfinished_jobs_with_user_queue_node_resources_and_walltime(
    fake: Fake,
) -> None:
    jobs = {j.id: j for j in await fake.batch().jobs(name=NAME)}

    assert sorted(jobs) == ["101.pbs01", "102.pbs01"]  # 103 has another name, 104 finished
    running, queued = jobs["101.pbs01"], jobs["102.pbs01"]
    assert (running.user, running.state, running.partition, running.node) == (
        "alice",
        JobState.RUNNING,
        "gpu",
        "gn01",
    )
    assert (running.cpus, running.gpus, running.mem_mb) == (4, 2, 16384)
    assert running.start == datetime.fromtimestamp(STIME, UTC)
    assert running.end == running.start + timedelta(hours=8)
    assert (queued.user, queued.state, queued.node, queued.start, queued.end) == (
        "bob",
        JobState.PENDING,
        None,
        None,
        None,
    )
    assert queued.mem_mb == 2048
    assert [j.id for j in await fake.batch().jobs(name=NAME, user="bob")] == ["102.pbs01"]
    assert [j.id for j in await fake.batch().jobs(user="alice")] == ["101.pbs01", "103.pbs01"]


async def test_job_by_short_or_full_id_and_finished_or_unknown_jobs_are_gone(fake: Fake) -> None:
    batch = fake.batch()
    job = await batch.job("101")
    assert job is not None and job.id == "101.pbs01" and job.state is JobState.RUNNING
    assert (await batch.job("101.pbs01")) == job
    assert await batch.job("104.pbs01") is None  # finished (PBS Pro: "Job has finished"; Torque: state C)
    assert await batch.job("999.pbs01") is None  # "Unknown Job Id"


async def test_qdel_cancels_and_cancelling_a_gone_job_is_no_error(fake: Fake) -> None:
    batch = fake.batch()
    await batch.cancel("101.pbs01")
    assert fake.state_of("101.pbs01") in ("F", "C")
    assert await batch.job("101.pbs01") is None
    await batch.cancel("101.pbs01")  # finished now: success
    await batch.cancel("999.pbs01")  # unknown: success
    assert [c["argv"] for c in fake.calls() if c["cmd"] == "qdel"] == [
        ["101.pbs01"],
        ["101.pbs01"],
        ["999.pbs01"],
    ]


@pytest.mark.parametrize(
    "failure",
    ["111:qstat: cannot connect to server pbs01 (errno=111)", "1:pbs_connect: Connection refused"],
)
async def test_a_failing_server_is_a_batch_error_never_gone(fake: Fake, failure: str) -> None:
    fake.extra["FAKE_PBS_FAIL"] = failure
    batch = fake.batch()
    with pytest.raises(BatchError) as err:
        await batch.job("101.pbs01")
    assert err.value.returncode == int(failure.split(":")[0])
    with pytest.raises(BatchError):
        await batch.jobs(name=NAME)
    with pytest.raises(BatchError):
        await batch.cancel("101.pbs01")
    assert fake.state_of("101.pbs01") == "R"


async def test_empty_output_is_an_error_for_pbs_pro_json_but_no_jobs_for_torque(fake: Fake) -> None:
    fake.extra["FAKE_PBS_FAIL"] = "0:"  # exit 0, nothing on stdout
    batch = fake.batch()
    if fake.format in ("json", "auto"):  # auto asks for JSON first
        # PBS Pro always prints a JSON object (without "Jobs" when none): silence is a fault.
        with pytest.raises(BatchError, match="JSON"):
            await batch.jobs()
        with pytest.raises(BatchError, match="JSON"):
            await batch.job("101.pbs01")
    else:
        # Torque prints nothing when no job exists.
        assert await batch.jobs() == []


async def test_qdel_refused_is_a_batch_error(fake: Fake) -> None:
    require_real_part(os.geteuid() == 0, "root (to run qdel as another user with runuser)")
    create_unix_user("reaperpbs1")
    batch = fake.batch(prefix="runuser -u {username} --")

    with pytest.raises(BatchError, match="Unauthorized") as err:
        await batch.cancel("101.pbs01", user="reaperpbs1")  # not the owner
    assert err.value.returncode == 159
    assert fake.state_of("101.pbs01") == "R"
    assert fake.calls()[-1]["user"] == "reaperpbs1"  # the prefix ran it as that user


async def test_a_hanging_qstat_times_out_and_is_killed(fake: Fake) -> None:
    fake.extra["FAKE_PBS_HANG"] = "60"
    batch = fake.batch(timeout=1)
    started = time.monotonic()
    with pytest.raises(BatchError, match="timed out"):
        await batch.job("101.pbs01")
    assert time.monotonic() - started < 5
    pid = int(Path(str(fake.log_path) + ".pid").read_text())  # noqa: ASYNC240
    await asyncio.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_parsers_read_documented_samples() -> None:
    pbspro = """{
        "timestamp":1664911414, "pbs_version":"19.0.0", "pbs_server":"meta-pbs",
        "Jobs":{"12860476.meta-pbs":{"Job_Name":"swrap_01","Job_Owner":"jan@META","job_state":"R",
          "queue":"charon_2h","exec_host":"charon24/0*2+charon21/0*2",
          "Resource_List":{"mem":"4194304kb","ncpus":4,"walltime":"02:00:00"},
          "stime":"Tue Oct  4 21:23:21 2022"}}}"""
    [job] = parse_pbs_json(pbspro, ZoneInfo("Europe/Prague"))
    assert (job.user, job.node, job.cpus, job.gpus, job.mem_mb) == ("jan", "charon24", 4, 0, 4096)
    assert job.start == datetime(2022, 10, 4, 19, 23, 21, tzinfo=UTC)
    assert job.end == job.start + timedelta(hours=2)
    assert parse_pbs_json('{"timestamp":1, "pbs_version":"2024.1", "pbs_server":"gadi"}') == []
    torque = (
        "<Data><Job><Job_Id>55.head</Job_Id><Job_Name>nb</Job_Name><Job_Owner>dan@login</Job_Owner>"
        "<job_state>R</job_state><queue>batch</queue><exec_host>n3/0-1+n4/0-1</exec_host>"
        "<Resource_List><nodes>2:ppn=2:gpus=1</nodes><walltime>1:00:00:00</walltime></Resource_List>"
        "<start_time>1700000000</start_time></Job></Data>"
    )
    [t] = parse_torque_xml(torque)
    assert (t.user, t.node, t.cpus, t.gpus, t.partition) == ("dan", "n3", 4, 2, "batch")
    assert t.end == datetime.fromtimestamp(1700000000, UTC) + timedelta(days=1)
    with pytest.raises(BatchError):
        parse_torque_xml("<Data><Job>")


def test_make_batch_system_builds_pbs_and_torque() -> None:
    pbs = make_batch_system({"system": "pbs", "commands": {"qstat": "/opt/pbs/bin/qstat"}})
    assert isinstance(pbs, PbsBatch) and pbs.format == "json" and pbs.qstat == "/opt/pbs/bin/qstat"
    torque = make_batch_system({"system": "torque"})
    assert isinstance(torque, PbsBatch) and torque.format == "xml"
    for fmt in ("text", "auto"):
        chosen = make_batch_system({"system": "pbs", "pbs_format": fmt})
        assert isinstance(chosen, PbsBatch) and chosen.format == fmt
    with pytest.raises(ValueError):
        make_batch_system({"system": "pbs", "pbs_format": "yaml"})
    with pytest.raises(ValueError):
        make_batch_system({"system": "pbs", "commands": {"squeue": "x"}})


# --------------------------------------------------------------------------- CPU accounting


async def test_cpu_usage_reads_resources_used_cput_of_every_asked_job_in_one_qstat(fake: Fake) -> None:
    batch = fake.batch()
    await batch.jobs()  # auto: the format is found first (a refused option costs one call, once)
    before = len(fake.calls())

    cpu = await batch.cpu_usage(["101", "102.pbs01", "103.pbs01", "104.pbs01", "999.pbs01"])

    # 102 is queued (no cput yet), 104 finished, 999 unknown: absent, which means "unknown"
    assert cpu == {"101": 3723.0, "103.pbs01": 5.0}
    assert len(fake.calls()) == before + 1
    assert await batch.cpu_usage([]) == {}


async def test_cpu_usage_of_a_failing_server_is_a_batch_error_never_an_empty_answer(fake: Fake) -> None:
    fake.extra["FAKE_PBS_FAIL"] = "111:qstat: cannot connect to server pbs01 (errno=111)"
    with pytest.raises(BatchError, match="cannot connect"):
        await fake.batch().cpu_usage(["101.pbs01"])
    with pytest.raises(BatchError, match="not a PBS job id"):
        await fake.batch().cpu_usage(["101.pbs01", "1; rm -rf /"])


def test_a_cput_that_is_not_a_time_is_a_batch_error() -> None:
    assert pbs_cpu_seconds([("1.s", {"job_state": "R", "resources_used.cput": "00:10:00"}),
                            ("2.s", {"job_state": "R"}),
                            ("3.s", {"job_state": "C", "resources_used.cput": "00:09:00"}),
                            ("4.s", {"job_state": "R", "resources_used.cput": "42"})]) == {"1.s": 600.0, "4.s": 42.0}
    with pytest.raises(BatchError, match="resources_used.cput"):
        pbs_cpu_seconds([("1.s", {"job_state": "R", "resources_used.cput": "lots"})])


async def test_auto_finds_the_format_qstat_accepts_and_keeps_it() -> None:
    folder = Path(tempfile.mkdtemp(prefix="fake-pbs-"))
    try:
        fake = Fake(folder, "torque", "auto")
        batch = fake.batch()
        assert {j.id for j in await batch.jobs(name=NAME)} == {"101.pbs01", "102.pbs01"}
        assert (await batch.job("101")) is not None
        assert [c["argv"] for c in fake.calls()] == [["-f", "-F", "json"], ["-x"], ["-x", "101"]]
        # A server that cannot be reached is no reason to change format
        pbspro = Fake(folder, "pbspro", "auto")
        pbspro.extra["FAKE_PBS_FAIL"] = "111:qstat: cannot connect to server pbs01 (errno=111)"
        with pytest.raises(BatchError):
            await pbspro.batch().jobs()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- the classic qstat -f text

RECORDED = FAKE_DIR / "recorded"


def test_text_of_torque_reads_wrapped_values_nodes_ppn_gpus_start_and_cput() -> None:
    text = (RECORDED / "torque-4.2-qstat-f.txt").read_text()
    running, queued = parse_qstat_text(text, ZoneInfo("America/Chicago"))
    assert (running.id, running.user, running.name, running.state, running.partition, running.node) == (
        "48211.torque01.example.edu", "dana", "jupyterhub-reaper", JobState.RUNNING, "batch", "cn112")
    assert (running.cpus, running.gpus, running.mem_mb) == (4, 1, 8192)  # nodes=1:ppn=4:gpus=1 (ncpus says 1)
    assert running.start == datetime(2024, 3, 4, 15, 12, 31, tzinfo=UTC)
    assert running.end == running.start + timedelta(hours=12)
    assert (queued.state, queued.user, queued.cpus, queued.start, queued.node) == (
        JobState.PENDING, "eli", 2, None, None)
    records = dict(text_records(text))
    assert records["48211.torque01.example.edu"]["Variable_List"].endswith(
        "PBS_O_PATH=/home/dana/miniconda3/envs/hub/bin:/home/dana/miniconda3/condabin:/usr/local/bin:/usr/bin:"
        "/bin:/opt/torque-4.2.10/bin:/opt/torque-4.2.10/sbin,PBS_O_MAIL=/var/spool/mail/dana,PBS_O_SHELL=/bin/bash,"
        "PBS_O_LANG=en_US.UTF-8,PBS_O_WORKDIR=/home/dana,PBS_O_HOST=login02.example.edu,PBS_O_SERVER=torque01")
    assert records["48211.torque01.example.edu"]["submit_args"].endswith("-l walltime=12:00:00 "
                                                                         "/home/dana/.jupyterhub_batch.sh")
    assert pbs_cpu_seconds(text_records(text)) == {"48211.torque01.example.edu": 4061.0}


def test_text_of_pbs_pro_reads_ncpus_ngpus_stime_and_cput() -> None:
    text = (RECORDED / "pbspro-2022-qstat-f.txt").read_text()
    [job] = parse_qstat_text(text, ZoneInfo("UTC"))
    assert (job.id, job.user, job.state, job.partition, job.node, job.cpus, job.gpus, job.mem_mb) == (
        "7731.pbs-head", "fay", JobState.RUNNING, "workq", "node07", 2, 1, 4096)
    assert job.start == datetime(2024, 6, 11, 14, 2, 12, tzinfo=UTC)
    assert job.end == job.start + timedelta(hours=4)
    assert dict(text_records(text))["7731.pbs-head"]["comment"].endswith("(node07:ncpus=2:mem=4194304kb:ngpus=1)")
    assert pbs_cpu_seconds(text_records(text)) == {"7731.pbs-head": 1865.0}


def test_text_of_slurm_wlm_torque_reads_tab_indents_uid_owners_and_unlimited_walltime() -> None:
    jobs = parse_qstat_text((RECORDED / "slurm-wlm-torque-qstat-f.txt").read_text(), ZoneInfo("UTC"))
    assert [(j.id, j.user, j.name, j.state, j.partition, j.node, j.cpus) for j in jobs] == [
        ("1", "reaperslurm1", "jupyterhub-reaper", JobState.RUNNING, "gpu", "vm", 2),
        ("2", "reaperslurm1", "idle", JobState.RUNNING, "cpu", "vm", 1),
        ("3", "reaperslurm1", "held", JobState.PENDING, "cpu", None, 1),
    ]
    # the wrapper prints no start time and no resources_used: no end, no CPU figure (unknown)
    assert all(j.start is None and j.end is None for j in jobs)
    assert pbs_cpu_seconds(text_records((RECORDED / "slurm-wlm-torque-qstat-f.txt").read_text())) == {}
    [cancelled] = parse_qstat_text((RECORDED / "slurm-wlm-torque-qstat-f-cancelled.txt").read_text())
    assert cancelled.state is JobState.COMPLETED and cancelled.finished


@pytest.mark.parametrize(
    "garbage",
    [
        "qstat: Unknown Job Id 5.s\n",  # an error message on stdout
        "    job_state = R\n",  # an attribute outside a block
        "Job Id: 1.s\n\tcontinued with nothing before\n",
        "Job Id: 1.s\n    job_state = R\nnot indented\n",
        "<Data><Job><Job_Id>1</Job_Id></Job></Data>\n",  # XML where text was expected
    ],
)
def test_text_that_is_not_qstat_f_is_a_batch_error(garbage: str) -> None:
    with pytest.raises(BatchError, match="qstat -f line"):
        parse_qstat_text(garbage)


def test_no_jobs_is_an_empty_text() -> None:
    assert parse_qstat_text("") == [] and parse_qstat_text("\n\n") == []


_KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}(\.[a-z_]{1,8})?", fullmatch=True)
_VALUES = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=150)


@given(st.lists(st.tuples(st.from_regex(r"[0-9]{1,7}(\.[a-z][a-z0-9-]{0,10})?", fullmatch=True),
                          st.dictionaries(_KEYS, _VALUES, min_size=1, max_size=8)), max_size=4),
       st.sampled_from(["    ", "\t"]))
def test_any_qstat_f_text_reads_back_its_attributes_whole(jobs: list, indent: str) -> None:
    text = ""
    for job_id, attrs in jobs:
        text += f"Job Id: {job_id}\n"
        for key, value in attrs.items():
            line = f"{indent}{key} = {value}"
            # long lines wrap as qstat wraps them (onto tab-indented lines when attributes use spaces)
            wrap = "\t" if indent == "    " else "\t\t"
            text += line[:79] + "".join(f"\n{wrap}{line[i:i + 71]}" for i in range(79, len(line), 71)) + "\n"
        text += "\n"
    assert text_records(text) == [(job_id, dict(attrs)) for job_id, attrs in jobs]


@given(st.text(max_size=400))
def test_garbage_text_never_raises_anything_but_batch_error(text: str) -> None:
    try:
        jobs = parse_qstat_text(text, ZoneInfo("UTC"))
        pbs_cpu_seconds(text_records(text))
    except BatchError:
        return
    assert all(isinstance(j.id, str) for j in jobs)


@given(st.lists(st.sampled_from(["Job Id: 1.s", "Job Id:\t2", "    job_state = R", "\tjob_state = Q",
                                 "    Resource_List.walltime = 99999999:00:00",
                                 "    Resource_List.walltime = 99999999999999999:00:00",
                                 "    Resource_List.walltime = -5:-1", "    stime = Tue Jun 11 14:02:12 2024",
                                 "    start_time = 99999999999999", "    Resource_List.nodes = 3:ppn=x:gpus=",
                                 "    resources_used.cput = 1-00:00:00", "    Resource_List.mem = 10000000000000tb",
                                 "\tcontinued", "", "    exec_host = ", "    euser = (0)"]), max_size=30))
def test_odd_but_well_formed_blocks_never_raise_anything_but_batch_error(lines: list[str]) -> None:
    # found so: a walltime beyond timedelta's range raised OverflowError
    text = "\n".join(lines)
    try:
        parse_qstat_text(text, ZoneInfo("UTC"))
        pbs_cpu_seconds(text_records(text))
    except BatchError:
        pass


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(), st.text(max_size=20),
                     st.sampled_from(["99999999999999999:00:00", "Tue Jun 11 14:02:12 2024", "1:ppn=2:gpus=1", "R", "F"]))
_ATTRS = st.dictionaries(
    st.sampled_from(["job_state", "Job_Owner", "euser", "Job_Name", "queue", "exec_host", "stime", "x"]),
    _SCALARS)
_RES = st.dictionaries(st.sampled_from(["ncpus", "ngpus", "mem", "walltime", "nodes", "procs", "cput"]),
                       st.one_of(_SCALARS, st.lists(_SCALARS, max_size=2)))


@given(st.dictionaries(st.text(max_size=8), st.one_of(
    st.tuples(_ATTRS, _RES, _RES).map(lambda t: {**t[0], "Resource_List": t[1], "resources_used": t[2]}),
    _SCALARS), max_size=3))
def test_any_json_answer_never_raises_anything_but_batch_error(jobs: dict) -> None:
    text = json.dumps({"Jobs": jobs})
    try:
        parse_pbs_json(text)
        pbs_cpu_seconds(json_records(text))
    except BatchError:
        pass


@given(st.lists(st.sampled_from(["<Data>", "</Data>", "<Job>", "</Job>", "<Job_Id>1</Job_Id>", "<job_state>R",
                                 "</job_state>", "<Resource_List><walltime>99999999999999999:0:0</walltime>",
                                 "</Resource_List>", "<start_time>1e99</start_time>", "<resources_used><cput>x",
                                 "</cput></resources_used>", "<", ">", "&", "text"]), max_size=30).map("".join))
def test_any_xml_answer_never_raises_anything_but_batch_error(text: str) -> None:
    try:
        parse_torque_xml(text)
        pbs_cpu_seconds(xml_records(text))
    except BatchError:
        pass
