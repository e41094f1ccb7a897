"""Batch-system adapters behind one small interface (see base.py).

    from reaper.batch import make_batch_system
    batch = make_batch_system({"system": "slurm", "env": {"SLURM_CONF": "/etc/slurm/slurm.conf"}})
    jobs = await batch.jobs(name="jupyterhub-reaper")
    cpu = await batch.cpu_usage(["42", "43"])   # {"42": 118.0}: CPU seconds so far; absent = unknown
    job = await batch.job("42")          # None only when Slurm says it is gone
    await batch.cancel("42", user="alice")

`make_batch_system` takes the `batch:` section of config.yaml (reaper.config.BatchSettings, which
validates it; a plain mapping is validated the same way):

    batch:
      system: auto             # auto | slurm | pbs | torque | none
      commands: {squeue: squeue, scancel: scancel, sstat: sstat}   # or {qstat: ..., qdel: ...}; paths allowed
      prefix: ""               # e.g. "sudo -n -u {username}" / "runuser -u {username} --" (cancel as the user)
      env: {SLURM_CONF: /etc/slurm/slurm.conf}
      timeout: 30              # seconds per command; the child is killed after it
      timezone: ""             # zone the batch system prints times in ("" = local)
      pbs_format: json         # pbs only: json (PBS Pro `qstat -f -F json`) | xml (Torque `qstat -x`)
                               #   | text (classic `qstat -f`) | auto (json, else xml, else text)

`auto` is decided by reaper.config.choose_batch_system (pure) from `command_runs` (the probe:
does `squeue --version`, then `qstat --version`, run with the service's environment and
batch.env?).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping
from datetime import tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from reaper.batch.base import BatchError, BatchSystem, CommandRunner, Job, JobState
from reaper.config import BatchSettings, ResolvedSystem, choose_batch_system

__all__ = [
    "BatchError", "BatchSystem", "CommandRunner", "Job", "JobState", "command_runs", "make_batch_system",
]

# The longest a probe of `auto` may take (it runs once, when the service starts).
PROBE_TIMEOUT = 10.0


def command_runs(section: BatchSettings) -> Callable[[str], bool]:
    """The probe of ``batch.system: auto``: ``runs(command)`` is True when ``command --version``
    exits 0 with the service's environment plus ``batch.env``. Slurm's commands fail so when
    they find no configuration (no slurm.conf, no SLURM_CONF); a missing command, one that
    cannot be run or one that hangs past the timeout does not run."""
    env = {**os.environ, **section.env}
    limit = min(section.timeout, PROBE_TIMEOUT)

    def runs(command: str) -> bool:
        try:
            proc = subprocess.Popen(
                [command, "--version"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: a hang is killed with its children
            )
        except (OSError, subprocess.SubprocessError):
            return False
        try:
            return proc.wait(timeout=limit) == 0
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False

    return runs


def _section(config: BatchSettings | Mapping[str, Any] | None) -> BatchSettings:
    if isinstance(config, BatchSettings):
        return config
    return BatchSettings.model_validate(dict(config or {}))  # ValidationError is a ValueError


def make_batch_system(
    config: BatchSettings | Mapping[str, Any] | None,
    *,
    system: ResolvedSystem | None = None,
    runs: Callable[[str], bool] | None = None,
) -> BatchSystem | None:
    """A BatchSystem from the `batch:` config section; None when no system is used.

    system: the system already chosen (reaper.config.choose_batch_system); default: chosen here,
    asking ``runs`` (default: the real probe, command_runs) when the section says auto."""
    section = _section(config)
    if system is None:
        system = choose_batch_system(section, runs or command_runs(section)).system
    if system == "none":
        return None
    tz: tzinfo | None = ZoneInfo(section.timezone) if section.timezone else None
    if system == "slurm":
        from reaper.batch.slurm import SlurmBatch

        return SlurmBatch(
            squeue=section.command("squeue"),
            scancel=section.command("scancel"),
            sstat=section.command("sstat"),
            prefix=section.prefix,
            env=section.env,
            timeout=section.timeout,
            tz=tz,
        )
    from reaper.batch.pbs import PbsBatch

    return PbsBatch(
        qstat=section.command("qstat"),
        qdel=section.command("qdel"),
        prefix=section.prefix,
        env=section.env,
        timeout=section.timeout,
        tz=tz,
        format=section.pbs_output(system),
    )
