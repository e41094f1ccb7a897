"""The PBS Pro / Torque adapter (reaper.batch.pbs) against fake `qstat` and `qdel` executables.

The fakes (tests/adapters/fake_pbs/) are found on PATH, print the documented output formats
(PBS Pro `qstat -f -F json`, Torque `qstat -x` XML) and the documented error messages, for jobs
kept in a JSON state file; `qdel` changes that file.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from reaper.batch import BatchError, JobState, make_batch_system
from reaper.batch.pbs import PbsBatch, parse_pbs_json, parse_torque_xml
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
             "walltime": "08:00:00", "stime": STIME},
            {"id": "102.pbs01", "name": NAME, "owner": "bob", "state": "Q", "queue": "cpu",
             "ncpus": 1, "mem": "2048mb", "walltime": "01:30:00"},
            {"id": "103.pbs01", "name": "other-job", "owner": "alice", "state": "R", "queue": "cpu",
             "exec_host": "cn07/3", "ncpus": 1, "stime": STIME},
            {"id": "104.pbs01", "name": NAME, "owner": "carol", "state": "F", "queue": "cpu",
             "exec_host": "cn01/0", "stime": STIME - 3600},
        ],
    }  # fmt: skip


class Fake:
    def __init__(self, folder: Path, flavor: str) -> None:
        self.folder = folder
        self.flavor = flavor
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
        fmt = "json" if self.flavor == "pbspro" else "xml"
        return PbsBatch(env=self.env, format=fmt, tz=ZoneInfo("UTC"), **kwargs)  # type: ignore[arg-type]

    def calls(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def state_of(self, job_id: str) -> str:
        return next(j["state"] for j in json.loads(self.state_path.read_text())["jobs"] if j["id"] == job_id)


@pytest.fixture(params=["pbspro", "torque"])
def fake(request: pytest.FixtureRequest) -> Iterator[Fake]:
    # A world-readable folder: the runuser-prefix test runs the fakes as another user.
    folder = Path(tempfile.mkdtemp(prefix="fake-pbs-"))
    os.chmod(folder, 0o777)
    try:
        yield Fake(folder, request.param)
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
    if fake.flavor == "pbspro":
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
    with pytest.raises(ValueError):
        make_batch_system({"system": "pbs", "commands": {"squeue": "x"}})
