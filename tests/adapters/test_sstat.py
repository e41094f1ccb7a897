"""Slurm's CPU accounting: reaper.batch.slurm.parse_sstat, parse_cpu_seconds and SlurmBatch.cpu_usage
against fake `sstat` executables (a shell script printing what the real sstat printed here).

The recorded outputs are from the harness's real Slurm 22.05.8 (tests/harness/slurm.py with
JobAcctGatherType=jobacct_gather/linux), `sstat -a -j IDS --noheader -P
--format=JobID,TRESUsageInTot,AveCPU,NTasks`; tests/integration/test_slurm_batch.py runs the real one.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reaper.batch import BatchError
from reaper.batch.base import parse_cpu_seconds
from reaper.batch.slurm import SSTAT_FORMAT, SlurmBatch, parse_sstat

# Job 1: a busy loop in the batch script; job 2: `sleep`; job 3: `srun -n2` of two busy loops
# (AveCPU is per task, TRESUsageInTot's cpu= the step's total).
RECORDED = (
    "1.batch|cpu=00:00:07,energy=0,fs/disk=48268,mem=9532K,pages=0,vmem=16444K|00:00:07|1\n"
    "2.batch|cpu=00:00:00,energy=0,fs/disk=29207,mem=10868K,pages=0,vmem=219452K|00:00:00|1\n"
    "3.batch|cpu=00:00:00,energy=0,fs/disk=29207,mem=10868K,pages=0,vmem=219452K|00:00:00|1\n"
    "3.0|cpu=00:00:08,energy=0,fs/disk=88236,mem=16040K,pages=0,vmem=27904K|00:00:04|2\n"
)
# JobAcctGatherType=jobacct_gather/none: a line, but nothing gathered (a step not sampled yet too)
NOT_GATHERED = "1.batch||213503982334-14:25:51|0\n"
# What sstat printed on stderr (exit 0 every time) in these cases:
PENDING = "sstat: error: No steps running for job 4\n"
ENDED = "sstat: error: couldn't get steps for job 5\n"  # and a stopped slurmctld, for every job
SLURMD_DOWN = (
    "sstat: error: slurm_job_step_stat: unknown return given from vm: 9001 rc = Communication connection failure\n"
    "sstat: error: problem getting step_layout for StepId=1.batch: Communication connection failure\n"
)


def test_recorded_output_sums_every_step_and_takes_all_tasks_of_a_step() -> None:
    assert SSTAT_FORMAT == "JobID,TRESUsageInTot,AveCPU,NTasks"
    assert parse_sstat(RECORDED) == {"1": 7.0, "2": 0.0, "3": 8.0}
    assert parse_sstat("") == {}


def test_without_tres_the_average_times_the_tasks_is_used_and_a_step_without_figures_drops_its_job() -> None:
    assert parse_sstat("7.batch||00:01:00|1\n7.0||00:00:30|4\n8_2.batch||1-00:00:01|1\n") == {
        "7": 180.0,
        "8_2": 86401.0,
    }
    # a step that printed no figure (just started): the job's sum would be short -> left out
    assert parse_sstat("7.batch||00:01:00|1\n7.0|||\n9.batch|cpu=00:00:02|00:00:02|1\n") == {"9": 2.0}


@pytest.mark.parametrize(
    "garbage",
    [
        "1.batch|00:00:07\n",  # the old two-field format
        "JobID|TRESUsageInTot|AveCPU|NTasks\n",  # a header (--noheader forgotten)
        "1.batch|cpu=soon|00:00:07|1\n",
        "1.batch||seven|1\n",
        "1.batch||00:00:07|many\n",
        "<html>proxy error</html>\n",
    ],
)
def test_anything_else_is_a_batch_error_not_an_empty_answer(garbage: str) -> None:
    with pytest.raises(BatchError):
        parse_sstat(garbage)


def test_cpu_times_in_every_form_slurm_and_pbs_print() -> None:
    assert parse_cpu_seconds("00:00:07") == 7
    assert parse_cpu_seconds("1-02:03:04") == 93784
    assert parse_cpu_seconds("05:06.250") == 306.25
    assert parse_cpu_seconds("123") == 123
    assert parse_cpu_seconds(" 100:00:00 ") == 360000
    for bad in ("", "x", "1-02:03", "-1", "00:00:07 s", "1:2:3:4"):
        assert parse_cpu_seconds(bad) is None, bad


@st.composite
def steps(draw: st.DrawFn) -> tuple[str, dict[str, float]]:
    """sstat lines for random jobs and steps, with the totals they must give."""
    want: dict[str, float] = {}
    lines = []
    for job in draw(st.lists(st.integers(1, 10**7), unique=True, max_size=6)):
        for step in draw(st.lists(st.sampled_from(["batch", "extern", "0", "1", "17"]), unique=True,
                                  min_size=1, max_size=4)):
            secs = draw(st.integers(0, 10 * 86400))
            tasks = draw(st.integers(1, 64))
            d, rest = divmod(secs, 86400)
            h, rest = divmod(rest, 3600)
            m, s = divmod(rest, 60)
            text = (f"{d}-" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"
            if draw(st.booleans()):
                lines.append(f"{job}.{step}|cpu={text},energy=0,mem=1M|00:00:00|{tasks}")
                want[str(job)] = want.get(str(job), 0.0) + secs
            else:
                lines.append(f"{job}.{step}||{text}|{tasks}")
                want[str(job)] = want.get(str(job), 0.0) + secs * tasks
    order = draw(st.permutations(lines))
    return "\n".join(order) + "\n", want


@given(steps())
def test_any_well_formed_answer_sums_to_the_steps_totals(case: tuple[str, dict[str, float]]) -> None:
    stdout, want = case
    assert parse_sstat(stdout) == want


@given(st.text(max_size=300))
def test_garbage_never_raises_anything_but_batch_error(text: str) -> None:
    try:
        out = parse_sstat(text)
    except BatchError:
        return
    assert all(isinstance(k, str) and v >= 0 for k, v in out.items())


# --------------------------------------------------------------------------- the adapter, fake sstat


def fake_sstat(tmp_path: Path, stdout: str, stderr: str = "", rc: int = 0) -> SlurmBatch:
    (tmp_path / "out").write_text(stdout)
    (tmp_path / "err").write_text(stderr)
    script = tmp_path / "sstat"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {tmp_path}/calls\n'
        f"cat {tmp_path}/out\ncat {tmp_path}/err >&2\nexit {rc}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return SlurmBatch(sstat=str(script), timeout=10)


async def test_one_command_for_all_jobs_and_the_answer_has_only_the_jobs_asked(tmp_path: Path) -> None:
    batch = fake_sstat(tmp_path, RECORDED, PENDING + ENDED)
    assert await batch.cpu_usage(["1", "3", "4", "5", "1"]) == {"1": 7.0, "3": 8.0}
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"-a -j 1,3,4,5 --noheader -P --format={SSTAT_FORMAT}"
    ]
    assert await batch.cpu_usage([]) == {}
    assert len((tmp_path / "calls").read_text().splitlines()) == 1  # nothing asked: nothing run


async def test_a_step_not_gathered_leaves_its_job_unknown_not_a_huge_figure(tmp_path: Path) -> None:
    assert parse_sstat(NOT_GATHERED) == {}
    assert parse_sstat(NOT_GATHERED + "2.batch|cpu=00:00:04|00:00:04|1\n") == {"2": 4.0}
    assert await fake_sstat(tmp_path, NOT_GATHERED).cpu_usage(["1"]) == {}


async def test_jobs_only_pending_are_an_empty_answer_the_controller_gave(tmp_path: Path) -> None:
    assert await fake_sstat(tmp_path, "", PENDING).cpu_usage(["4"]) == {}


async def test_no_steps_for_any_job_is_doubt_because_a_dead_controller_prints_the_same(tmp_path: Path) -> None:
    with pytest.raises(BatchError, match="none of the 2 jobs"):
        await fake_sstat(tmp_path, "", ENDED + "sstat: error: couldn't get steps for job 6\n").cpu_usage(["5", "6"])


async def test_a_node_that_does_not_answer_leaves_its_job_out_or_is_an_error_alone(tmp_path: Path) -> None:
    batch = fake_sstat(tmp_path, "2.batch|cpu=00:00:03|00:00:03|1\n1.0|cpu=00:00:09|00:00:09|1\n", SLURMD_DOWN)
    assert await batch.cpu_usage(["1", "2"]) == {"2": 3.0}  # job 1's batch step is missing: left out
    with pytest.raises(BatchError, match="Communication connection failure"):
        await fake_sstat(tmp_path, "", SLURMD_DOWN + ENDED).cpu_usage(["1", "5"])


async def test_an_error_naming_no_job_makes_every_figure_doubtful(tmp_path: Path) -> None:
    batch = fake_sstat(tmp_path, RECORDED, "sstat: error: something new and strange\n")
    with pytest.raises(BatchError, match="something new and strange"):
        await batch.cpu_usage(["1", "2"])


@pytest.mark.parametrize(
    ("stdout", "stderr", "rc", "match"),
    [
        ("", "sstat: fatal: Bad job/step specified: abc\n", 1, "exit 1"),
        ("", "sstat: error: Invalid field requested: \"TotalCPU\"\n", 1, "Invalid field"),
        ("1.batch|00:00:07\n", "", 0, "fields"),
        ("Segmentation fault\n", "", 0, "sstat line"),
    ],
)
async def test_a_failing_or_garbled_sstat_is_a_batch_error(
    tmp_path: Path, stdout: str, stderr: str, rc: int, match: str
) -> None:
    with pytest.raises(BatchError, match=match):
        await fake_sstat(tmp_path, stdout, stderr, rc).cpu_usage(["1"])


async def test_a_missing_sstat_and_a_bad_id_are_batch_errors(tmp_path: Path) -> None:
    with pytest.raises(BatchError, match="cannot run"):
        await SlurmBatch(sstat=str(tmp_path / "no-sstat-here")).cpu_usage(["1"])
    with pytest.raises(BatchError, match="not a Slurm job id"):
        await fake_sstat(tmp_path, RECORDED).cpu_usage(["1", "2;rm -rf /"])
    assert not (tmp_path / "calls").exists()


async def test_the_guard_passes_the_accounting_through_errors_included(tmp_path: Path) -> None:
    from reaper.batch.guard import JobGuard
    from reaper.ports import Guard

    guard = JobGuard(fake_sstat(tmp_path, RECORDED, PENDING), store=None)
    assert isinstance(guard, Guard)
    assert await guard.cpu_usage(["1", "4"]) == {"1": 7.0}
    assert await guard.cpu_usage([]) == {}
    assert len((tmp_path / "calls").read_text().splitlines()) == 1
    (tmp_path / "failing").mkdir()
    failing = JobGuard(fake_sstat(tmp_path / "failing", "", "sstat: fatal: oops\n", 1), store=None)
    with pytest.raises(BatchError, match="oops"):
        await failing.cpu_usage(["1"])
