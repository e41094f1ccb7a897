"""Batch-system adapters behind one small interface (see base.py).

    from reaper.batch import make_batch_system
    batch = make_batch_system({"system": "slurm", "env": {"SLURM_CONF": "/etc/slurm/slurm.conf"}})
    jobs = await batch.jobs(name="jupyterhub-reaper")
    job = await batch.job("42")          # None only when Slurm says it is gone
    await batch.cancel("42", user="alice")

`make_batch_system` reads the `batch:` section of config.yaml:

    batch:
      system: slurm            # slurm | pbs | none
      commands: {squeue: squeue, scancel: scancel}   # or {qstat: ..., qdel: ...}; paths allowed
      prefix: ""               # e.g. "sudo -n -u {username}" / "runuser -u {username} --" (cancel as the user)
      env: {SLURM_CONF: /etc/slurm/slurm.conf}
      timeout: 30              # seconds per command; the child is killed after it
      timezone: ""             # zone the batch system prints times in ("" = local)
      pbs_format: json         # pbs only: json (PBS Pro `qstat -f -F json`) | xml (Torque `qstat -x`)
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from reaper.batch.base import BatchError, BatchSystem, CommandRunner, Job, JobState

__all__ = ["BatchError", "BatchSystem", "CommandRunner", "Job", "JobState", "make_batch_system"]

_KEYS = {"system", "commands", "prefix", "env", "timeout", "timezone", "pbs_format"}


def make_batch_system(config: Mapping[str, Any] | None) -> BatchSystem | None:
    """A BatchSystem from the `batch:` config section; None when no system is configured."""
    cfg = dict(config or {})
    unknown = set(cfg) - _KEYS
    if unknown:
        raise ValueError(f"batch: unknown key(s) {sorted(unknown)}; known: {sorted(_KEYS)}")
    system = str(cfg.get("system") or "none").lower()
    if system == "none":
        return None
    commands = {str(k): str(v) for k, v in dict(cfg.get("commands") or {}).items()}
    prefix = str(cfg.get("prefix") or "")
    env = {str(k): str(v) for k, v in dict(cfg.get("env") or {}).items()}
    timeout = float(cfg.get("timeout", 30))
    if timeout <= 0:
        raise ValueError("batch.timeout must be positive")
    tz: tzinfo | None = ZoneInfo(str(cfg["timezone"])) if cfg.get("timezone") else None
    if system == "slurm":
        from reaper.batch.slurm import SlurmBatch

        bad = set(commands) - {"squeue", "scancel"}
        if bad:
            raise ValueError(f"batch.commands: unknown for slurm: {sorted(bad)}")
        return SlurmBatch(
            squeue=commands.get("squeue", "squeue"),
            scancel=commands.get("scancel", "scancel"),
            prefix=prefix,
            env=env,
            timeout=timeout,
            tz=tz,
        )
    if system in ("pbs", "torque"):
        from reaper.batch.pbs import PbsBatch

        bad = set(commands) - {"qstat", "qdel"}
        if bad:
            raise ValueError(f"batch.commands: unknown for pbs: {sorted(bad)}")
        fmt = str(cfg.get("pbs_format") or ("xml" if system == "torque" else "json"))
        return PbsBatch(
            qstat=commands.get("qstat", "qstat"),
            qdel=commands.get("qdel", "qdel"),
            prefix=prefix,
            env=env,
            timeout=timeout,
            tz=tz,
            format=fmt,
        )
    raise ValueError(f"batch.system must be slurm, pbs, torque or none, not {system!r}")
