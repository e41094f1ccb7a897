"""Which batch system the reaper uses (`batch.system`, default auto), and what follows from it.

The bug this guards against: a config with `slurm:` and `orphans:` but no `batch:` never built the
job guard, so an orphan job was never cancelled and stopped servers' jobs were never checked.
Now auto picks Slurm when `squeue` runs (here: a fake `squeue` script on PATH, or an injected
probe), and `slurm:`/`orphans:` with no system in use is a check-config error at their line.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reaper.batch import command_runs, make_batch_system
from reaper.batch.guard import JobGuard
from reaper.batch.pbs import PbsBatch
from reaper.batch.slurm import FORMAT, SlurmBatch
from reaper.cli import cmd_check_config
from reaper.config import BatchSettings, batch_problems, choose_batch_system, parse_settings
from reaper.service import make_stop_hook
from reaper.store import Store

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
# slurm: and orphans: written, no batch: section (the shape of the config that had the bug)
NO_BATCH = """\
defaults:
  channels: [log]
slurm:
  job_name: jupyterhub-reaper
  cancel_grace: 5s
orphans:
  grace: 10m
  cancel: true
"""


def never(command: str) -> bool:
    raise AssertionError(f"probed {command} for an explicit system")


def script(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# --------------------------------------------------------------------------- the choice (pure)


@pytest.mark.parametrize("system", ["slurm", "pbs", "torque", "none"])
def test_an_explicit_system_is_used_without_probing(system: str) -> None:
    choice = choose_batch_system(BatchSettings(system=system), never)  # type: ignore[arg-type]
    assert choice.system == system and choice.how == f"batch.system: {system}"


def test_auto_is_slurm_when_squeue_runs_else_pbs_when_qstat_runs_else_none() -> None:
    asked: list[str] = []

    def runs(*ok: str):
        def probe(command: str) -> bool:
            asked.append(command)
            return command in ok
        return probe

    assert BatchSettings().system == "auto"
    assert choose_batch_system(BatchSettings(), runs("squeue", "qstat")).system == "slurm"
    assert asked == ["squeue"]  # qstat is not asked once squeue runs
    asked.clear()
    pbs = choose_batch_system(BatchSettings(), runs("qstat"))
    assert pbs.system == "pbs" and pbs.how == "batch.system: auto; qstat runs" and asked == ["squeue", "qstat"]
    none = choose_batch_system(BatchSettings(), runs())
    assert none.system == "none" and none.how == "batch.system: auto; neither squeue nor qstat runs"
    for feature in ("guard", "orphan", "walltime", "job-aware rules"):
        assert feature in none.summary()
    # the configured paths are the ones probed
    section = BatchSettings.model_validate({"commands": {"squeue": "/opt/slurm/bin/squeue"}})
    assert choose_batch_system(section, runs("/opt/slurm/bin/squeue")).system == "slurm"
    assert choose_batch_system(section, runs("squeue")).system == "none"


def test_slurm_and_orphans_without_a_batch_system_are_problems_at_their_lines() -> None:
    s = parse_settings(NO_BATCH, "site.yaml", env={})
    none = choose_batch_system(s.batch, lambda c: False)
    problems = batch_problems(s, none)
    assert [(line, key) for line, key, _ in problems] == [(3, "slurm"), (6, "orphans")]
    assert "no batch system is used (batch.system: auto; neither squeue nor qstat runs)" in problems[0][2]
    assert batch_problems(s, choose_batch_system(s.batch, lambda c: c == "squeue")) == []
    explicit = parse_settings("batch: {system: none}\norphans: {cancel: false}\n", "site.yaml", env={})
    assert [(line, key) for line, key, _ in batch_problems(explicit, choose_batch_system(explicit.batch, never))] \
        == [(2, "orphans")]
    # nothing written, nothing to complain about
    bare = parse_settings("sweep_every: 5m\n", "site.yaml", env={})
    assert batch_problems(bare, choose_batch_system(bare.batch, lambda c: False)) == []


# --------------------------------------------------------------------------- the probe


def test_the_probe_runs_the_command_with_the_service_environment_and_batch_env(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # like Slurm's own commands: --version fails when no configuration is found
    script(tmp_path, "squeue", '[ "$1" = --version ] && [ -n "$SLURM_CONF" ] && echo "slurm 22.05.8"\n')
    script(tmp_path, "qstat", "exit 3\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("SLURM_CONF", raising=False)
    assert command_runs(BatchSettings())("squeue") is False
    assert command_runs(BatchSettings(env={"SLURM_CONF": "/etc/slurm/slurm.conf"}))("squeue") is True
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/slurm.conf")  # the service's own environment
    assert command_runs(BatchSettings())("squeue") is True
    assert command_runs(BatchSettings())("qstat") is False  # runs, but fails
    assert command_runs(BatchSettings())("sbatch-nowhere") is False  # not on PATH
    (tmp_path / "squeue").chmod(0o644)
    assert command_runs(BatchSettings())(str(tmp_path / "squeue")) is False  # cannot be run


def test_a_hanging_probe_is_killed_with_its_children_and_does_not_run(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    hang = script(tmp_path, "squeue", f"sleep 30 &\necho $! > {pid_file}\nwait\n")
    t0 = time.monotonic()
    assert command_runs(BatchSettings(timeout=0.5))(str(hang)) is False
    assert time.monotonic() - t0 < 10
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is delivered at once; a zombie (not yet reaped) is dead too
        try:
            if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the probe's child {child} outlived the timeout")


def test_make_batch_system_resolves_auto_with_the_probe() -> None:
    assert isinstance(make_batch_system({}, runs=lambda c: c == "squeue"), SlurmBatch)
    pbs = make_batch_system({"pbs_format": "xml"}, runs=lambda c: c == "qstat")
    assert isinstance(pbs, PbsBatch) and pbs.format == "xml"
    assert make_batch_system({}, runs=lambda c: False) is None
    assert make_batch_system({"system": "none"}, runs=never) is None
    torque = make_batch_system({"system": "torque"}, runs=never)
    assert isinstance(torque, PbsBatch) and torque.format == "xml"
    assert isinstance(make_batch_system(BatchSettings(system="slurm"), system="pbs"), PbsBatch)  # already chosen


# --------------------------------------------------------------------------- the guard (the bug)


def test_slurm_and_orphans_without_batch_build_the_guard_when_squeue_runs(caplog: pytest.LogCaptureFixture) -> None:
    s = parse_settings(NO_BATCH, "site.yaml", env={})
    with caplog.at_level(logging.INFO, logger="reaper.service"):
        guard = make_stop_hook(s, None, runs=lambda c: c == "squeue")
    assert isinstance(guard, JobGuard) and isinstance(guard.batch, SlurmBatch)
    assert guard.job_name == "jupyterhub-reaper" and guard.cancel_grace == timedelta(seconds=5)
    assert guard.orphan_grace == timedelta(minutes=10) and guard.orphan_cancel
    assert "batch system: slurm (batch.system: auto; squeue runs)" in caplog.text


def test_without_a_batch_system_the_start_log_says_what_is_off(caplog: pytest.LogCaptureFixture) -> None:
    s = parse_settings(NO_BATCH, "site.yaml", env={})
    with caplog.at_level(logging.INFO, logger="reaper.service"):
        assert make_stop_hook(s, None, runs=lambda c: False) is None
    [record] = [r for r in caplog.records if "batch system" in r.getMessage()]
    text = record.getMessage()
    assert record.levelno == logging.WARNING
    assert text.startswith("batch system: none (batch.system: auto; neither squeue nor qstat runs); off: ")
    assert "orphan reconciliation" in text and "walltime notices" in text
    assert "slurm: (line 3) and orphans: (line 6) set in the config but without effect" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="reaper.service"):
        assert make_stop_hook(parse_settings("", env={}), None, runs=lambda c: False) is None
    [record] = [r for r in caplog.records if "batch system" in r.getMessage()]
    assert record.levelno == logging.INFO  # nothing asked for that is off


async def test_an_orphan_is_cancelled_with_only_slurm_and_orphans_configured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through the real probe: fake squeue/scancel on PATH, the guard built from a
    config without batch:, an orphan job listed by squeue, cancelled after orphans.grace."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scancel.log"
    row = "|".join(["4242", "alice", "RUNNING", "cpu", "cn01", "cn01", "1", "1", "2", "4G", "cpu=2,mem=4G",
                    "N/A", "N/A", "N/A", "2026-11-25T10:00:00", "2026-11-26T10:00:00", "jupyterhub-reaper"])
    script(bin_dir, "squeue", f"""case "$1" in --version) echo "slurm 22.05.8"; exit 0;; esac
case "$*" in *"--Format={FORMAT}"*) echo '{row}';; *) echo "unexpected: $*" >&2; exit 2;; esac
""")
    script(bin_dir, "scancel", f'echo "$*" >> {calls}\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    try:
        guard = make_stop_hook(parse_settings(NO_BATCH, env={}), store)
        assert isinstance(guard, JobGuard)
        jobs = await guard.hub_jobs()
        assert jobs is not None and list(jobs) == ["4242"]
        assert await guard.reconcile([], jobs, NOW) == []  # seen first: within the grace
        assert not calls.exists()
        orphans = await guard.reconcile([], await guard.hub_jobs(), NOW + timedelta(minutes=11))
        assert [j.id for j in orphans] == ["4242"] and guard.orphans_cancelled == 1
        assert calls.read_text().split() == ["4242"]
        assert any(a.kind == "scancel" and a.ok for a in store.reports.recent_actions(NOW - timedelta(days=1)))
    finally:
        store.close()


# --------------------------------------------------------------------------- check-config


def _args(path: Path) -> argparse.Namespace:
    return argparse.Namespace(path=str(path), config=None)


def test_check_config_rejects_slurm_and_orphans_without_a_batch_system(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "reaper.yaml"
    cfg.write_text(NO_BATCH)
    assert cmd_check_config(_args(cfg), runs=lambda c: False) == 2
    out = capsys.readouterr()
    assert f"{cfg}:3: slurm: set, but no batch system is used" in out.err
    assert f"{cfg}:6: orphans: set, but no batch system is used" in out.err
    assert "# batch system: none (batch.system: auto; neither squeue nor qstat runs); off: " in out.err
    assert "valid" not in out.out
    cfg.write_text("batch:\n  system: none\nslurm: {cancel_retries: 2}\n")
    assert cmd_check_config(_args(cfg), runs=never) == 2
    assert f"{cfg}:3: slurm: set, but no batch system is used (batch.system: none)" in capsys.readouterr().err


def test_check_config_says_which_system_is_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "reaper.yaml"
    cfg.write_text(NO_BATCH)
    assert cmd_check_config(_args(cfg), runs=lambda c: c == "squeue") == 0
    out = capsys.readouterr().out
    assert "valid" in out and "# batch system: slurm (batch.system: auto; squeue runs)\n" in out
    assert "system: auto" in out  # the effective settings show what was written
    cfg.write_text("sweep_every: 5m\n")
    assert cmd_check_config(_args(cfg), runs=lambda c: False) == 0
    assert "# batch system: none (batch.system: auto; neither squeue nor qstat runs); off: " in capsys.readouterr().out


def _cli(path: Path, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CONF", "REAPER_CONFIG")}
    env.update(PATH=str(bin_dir), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "reaper.cli", "check-config", str(path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


def test_the_shipped_config_checks_on_a_slurm_hub_and_fails_without_one(tmp_path: Path) -> None:
    """config.yaml (batch.system: auto, slurm: and orphans: written) through the real command
    and the real probe: valid where squeue runs, an error naming both sections where nothing does."""
    shipped = ROOT / "config.yaml"
    lines = shipped.read_text().splitlines()
    slurm_line = lines.index("slurm:") + 1
    orphans_line = lines.index("orphans:") + 1
    slurm_bin = tmp_path / "slurm-bin"
    slurm_bin.mkdir()
    script(slurm_bin, "squeue", 'echo "slurm 22.05.8"\n')
    r = _cli(shipped, slurm_bin)
    assert r.returncode == 0, r.stderr
    assert "# batch system: slurm (batch.system: auto; squeue runs)" in r.stdout
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    r = _cli(shipped, empty)
    assert r.returncode == 2, r.stdout
    assert f"{shipped}:{slurm_line}: slurm: set, but no batch system is used" in r.stderr
    assert f"{shipped}:{orphans_line}: orphans: set, but no batch system is used" in r.stderr
