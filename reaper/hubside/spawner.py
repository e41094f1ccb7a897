"""The Slurm spawner shipped with jupyterhub-reaper: batchspawner's SlurmSpawner, hardened.

    c.JupyterHub.spawner_class = "reaper.hubside.spawner.SlurmSpawner"

What it changes (batchspawner 1.3.0):

- **A squeue error is "unknown", never "gone".** batchspawner takes any squeue output that does
  not match its narrow `state_unknown_re` as job-not-found, and the hub then forgets a job that
  still runs (batchspawner issues #315, #171). Here only a positive answer means gone: squeue
  exits 0 and does not list the job (or lists a finished state), or says `Invalid job id
  specified`. Every other failure, and a timeout, is `JobStatus.UNKNOWN`: the hub keeps the
  server and polls again.
- **Every batch command has a timeout** (`batch_command_timeout`, default 30 s); the command's
  process group is killed when it expires (batchspawner waits forever).
- **scancel is retried** (`cancel_retries`); "already completing or completed" / "Invalid job id"
  count as success. If it still fails, `stop()` raises so that the hub's stop visibly fails and
  the reaper's batch guard cancels the job (batchspawner only logs it).
- **exec_prefix** defaults to `sudo -E -u {username}` where `sudo` exists (real sites), else
  `runuser -u {username} --` when the hub runs as root (containers and these test machines);
  set it explicitly to override.
- **Bind address**: `server_ip` (e.g. "127.0.0.1") adds `--ServerApp.ip=...` to the server's
  arguments; a loopback `server_ip` (or a `--ServerApp.ip=127.x` already in `Spawner.args`) is
  also the address the hub connects to (instead of the node name squeue prints).
- **Stable job name** `job_name` (default "jupyterhub-reaper"): the reaper finds the hub's jobs
  (and orphans) by it.
- **State** records `server_url` (http://host:port of the server itself, besides batchspawner's
  `job_id` and `job_status`) so the reaper can probe the server without going through the
  proxy (probes through the proxy count as activity).
- **user_options**: partition, runtime, memory and GPUs, offered in a form and accepted from the
  REST API, checked against admin-configured choices (`partition_choices`, `runtime_choices`,
  `memory_choices`, `max_gpus`, `gpu_partitions`); unknown keys are refused (batchspawner copies
  every user_options key into the batch script's variables). They become `#SBATCH --partition`,
  `--time`, `--mem` and `--gres=gpu:N`.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import ipaddress
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import batchspawner
from batchspawner import JobStatus, format_template
from traitlets import Bool, Float, Integer, List, Unicode, default

__all__ = ["SlurmSpawner", "JobStatus"]

BATCH_SCRIPT = """#!/bin/bash
#SBATCH --output={{homedir}}/jupyterhub_slurmspawner_%j.log
#SBATCH --job-name={{job_name}}
#SBATCH --chdir={{homedir}}
#SBATCH --export={{keepvars}}
#SBATCH --get-user-env=L
{% if partition  %}#SBATCH --partition={{partition}}
{% endif %}{% if runtime    %}#SBATCH --time={{runtime}}
{% endif %}{% if memory     %}#SBATCH --mem={{memory}}
{% endif %}{% if gres       %}#SBATCH --gres={{gres}}
{% endif %}{% if nprocs     %}#SBATCH --cpus-per-task={{nprocs}}
{% endif %}{% if account    %}#SBATCH --account={{account}}
{% endif %}{% if qos        %}#SBATCH --qos={{qos}}
{% endif %}{% if reservation%}#SBATCH --reservation={{reservation}}
{% endif %}{% if options    %}#SBATCH {{options}}
{% endif %}
set -euo pipefail

trap 'echo SIGTERM received' TERM
{{prologue}}
{% if srun %}{{srun}} {% endif %}{{cmd}}
echo "jupyterhub-singleuser ended gracefully"
{{epilogue}}
"""

# squeue/scancel answers that positively mean "this job no longer exists".
GONE_RE = re.compile(r"Invalid job id specified", re.I)
CANCEL_GONE_RE = re.compile(r"Invalid job id specified|already completing or completed", re.I)
FINISHED_STATES = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL",
                   "OUT_OF_MEMORY", "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT")  # fmt: skip
OPTION_KEYS = ("partition", "runtime", "memory", "gpus")
_RUNTIME_RE = re.compile(r"^(?:\d+-)?\d{1,3}(?::\d{1,2}){0,2}$|^\d+$")
_MEMORY_RE = re.compile(r"^\d+[KMGT]?$", re.I)


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


class SlurmSpawner(batchspawner.SlurmSpawner):  # type: ignore[misc]
    """batchspawner's SlurmSpawner, hardened for jupyterhub-reaper (see the module docstring)."""

    batch_script = Unicode(BATCH_SCRIPT).tag(config=True)

    job_name = Unicode(
        "jupyterhub-reaper",
        help="Slurm job name of every server job (#SBATCH --job-name). The reaper lists the hub's "
        "jobs by this name: keep it stable and the same as the reaper's `batch.job_name`.",
    ).tag(config=True)

    server_ip = Unicode(
        "",
        help="Address the single-user server binds to (--ServerApp.ip). Empty: batchspawner's "
        "0.0.0.0. A loopback address is also what the hub connects to (single-machine tests).",
    ).tag(config=True)

    batch_command_timeout = Float(
        30.0, help="Seconds an sbatch/squeue/scancel may take; then it is killed (status unknown)."
    ).tag(config=True)

    cancel_retries = Integer(3, help="scancel attempts before stop() gives up and raises.").tag(config=True)
    cancel_retry_delay = Float(1.0, help="Seconds between scancel attempts.").tag(config=True)

    partition_choices = List(
        Unicode(), help="Partitions users may choose (first = default). Empty: req_partition only."
    ).tag(config=True)
    runtime_choices = List(
        Unicode(), help="Walltimes users may choose, Slurm syntax (first = default). Empty: req_runtime only."
    ).tag(config=True)
    memory_choices = List(
        Unicode(), help="Memory sizes users may choose, e.g. '8G' (first = default). Empty: req_memory only."
    ).tag(config=True)
    max_gpus = Integer(0, help="Most GPUs a user may request (--gres=gpu:N); 0: none.").tag(config=True)
    gpu_partitions = List(
        Unicode(), help="Partitions where GPUs may be requested. Empty: any partition."
    ).tag(config=True)
    offer_options_form = Bool(
        True, help="Show the partition/runtime/memory/GPU form when there is something to choose."
    ).tag(config=True)

    server_url = Unicode("")

    @default("exec_prefix")
    def _exec_prefix_default(self) -> str:
        if shutil.which("sudo"):
            return "sudo -E -u {username}"
        if os.geteuid() == 0 and shutil.which("runuser"):
            return "runuser -u {username} --"
        return "sudo -E -u {username}"

    @default("batchspawner_singleuser_cmd")
    def _singleuser_cmd_default(self) -> str:
        beside = Path(sys.executable).parent / "batchspawner-singleuser"
        return str(beside) if beside.exists() else "batchspawner-singleuser"

    # --- bind address ------------------------------------------------------------------------------
    def _bind_ip(self) -> str:
        if self.server_ip:
            return str(self.server_ip)
        for arg in reversed(list(self.args)):
            m = re.match(r"^--(?:ServerApp|NotebookApp)\.ip=(.+)$", arg)
            if m:
                return m.group(1).strip("'\"")
        return ""

    def get_args(self) -> list[str]:
        args: list[str] = list(super().get_args())
        if self.server_ip and not any(a.startswith("--ServerApp.ip=") for a in self.args):
            args.append(f"--ServerApp.ip={self.server_ip}")
        return args

    def state_gethost(self) -> str | None:
        bind = self._bind_ip()
        if bind and _loopback(bind) and not self.state_exechost_exp:
            return bind
        host: str | None = super().state_gethost()
        return host

    # --- user options ------------------------------------------------------------------------------
    @default("options_form")
    def _options_form_default(self) -> Any:
        return self._render_options_form

    def _render_options_form(self, spawner: Any = None) -> str:
        if not self.offer_options_form:
            return ""
        if not (len(self.partition_choices) > 1 or len(self.runtime_choices) > 1
                or len(self.memory_choices) > 1 or self.max_gpus > 0):  # fmt: skip
            return ""

        def select(name: str, label: str, choices: list[str]) -> str:
            if not choices:
                return ""
            opts = "".join(f'<option value="{html.escape(c)}">{html.escape(c)}</option>' for c in choices)
            return (f'<div class="form-group"><label for="{name}">{label}</label>'
                    f'<select class="form-control" name="{name}" id="{name}">{opts}</select></div>')  # fmt: skip

        parts = [
            select("partition", "Partition", list(self.partition_choices)),
            select("runtime", "Run time (the job ends then)", list(self.runtime_choices)),
            select("memory", "Memory", list(self.memory_choices)),
        ]
        if self.max_gpus > 0:
            where = f" (partitions: {', '.join(self.gpu_partitions)})" if self.gpu_partitions else ""
            parts.append(
                select("gpus", f"GPUs{html.escape(where)}", [str(n) for n in range(self.max_gpus + 1)])
            )
        return "\n".join(p for p in parts if p)

    def options_from_form(self, formdata: dict[str, list[str]]) -> dict[str, Any]:
        raw = {k: (formdata.get(k) or [""])[0].strip() for k in OPTION_KEYS if formdata.get(k)}
        return self.validate_user_options(raw)

    def validate_user_options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        """Check options against the admin's choices; return them complete and normalised.

        Raises ValueError (the hub shows it to the user) on an unknown key or a value not allowed.
        """
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTION_KEYS))
        if unknown:
            raise ValueError(f"unknown server option(s): {', '.join(unknown)}")
        out: dict[str, Any] = {}

        def choose(key: str, choices: list[str], fixed: str, pattern: re.Pattern[str]) -> None:
            value = str(options.get(key, "") or "").strip()
            if choices:
                if not value:
                    value = choices[0]
                if value not in choices:
                    raise ValueError(f"{key} {value!r} is not one of {', '.join(choices)}")
            elif value and value != fixed:
                raise ValueError(f"{key} cannot be chosen on this hub")
            else:
                value = fixed
            if value and not pattern.match(value):
                raise ValueError(f"{key} {value!r} is not valid")
            if value:
                out[key] = value

        choose("partition", list(self.partition_choices), self.req_partition, re.compile(r"^[\w.-]+$"))
        choose("runtime", list(self.runtime_choices), self.req_runtime, _RUNTIME_RE)
        choose("memory", list(self.memory_choices), self.req_memory, _MEMORY_RE)
        gpus_raw = options.get("gpus", 0)
        try:
            gpus = int(gpus_raw or 0)
        except (TypeError, ValueError):
            raise ValueError(f"gpus {gpus_raw!r} is not a number") from None
        if gpus < 0 or gpus > self.max_gpus:
            raise ValueError(f"gpus must be between 0 and {self.max_gpus}, not {gpus}")
        if gpus and self.gpu_partitions and out.get("partition") not in self.gpu_partitions:
            raise ValueError(f"GPUs can only be requested on partition {', '.join(self.gpu_partitions)}")
        out["gpus"] = gpus
        return out

    def get_req_subvars(self) -> dict[str, Any]:
        subvars: dict[str, Any] = dict(super().get_req_subvars())
        subvars["job_name"] = self.job_name
        opts = self.user_options or {}
        for key in ("partition", "runtime", "memory"):
            if opts.get(key):
                subvars[key] = opts[key]
        gpus = int(opts.get("gpus") or 0)
        gres = [g for g in str(subvars.get("gres") or "").split(",") if g and not g.startswith("gpu")]
        if gpus > 0:
            gres.append(f"gpu:{gpus}")
        subvars["gres"] = ",".join(gres)
        return subvars

    async def start(self) -> tuple[str, int]:
        self.user_options = self.validate_user_options(self.user_options)
        self.server_url = ""
        ip, port = await super().start()
        if ip and port:
            self.server_url = f"http://{ip}:{port}"
        return ip, port

    # --- state -----------------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        if self.server_url:
            state["server_url"] = self.server_url
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.server_url = str(state.get("server_url", "") or "")

    def clear_state(self) -> None:
        super().clear_state()
        self.server_url = ""

    # --- commands ----------------------------------------------------------------------------------------
    async def run_command(self, cmd: str, input: str | None = None, env: dict[str, str] | None = None) -> str:
        """Like batchspawner's, plus a timeout that kills the command's whole process group.

        Returns stdout; raises RuntimeError(stderr) on a non-zero exit or a timeout."""
        proc = await asyncio.create_subprocess_shell(
            cmd,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(input=input.encode() if input else None), self.batch_command_timeout
            )
        except (TimeoutError, asyncio.CancelledError) as e:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5)
            if isinstance(e, asyncio.CancelledError):
                raise
            self.log.error("Command timed out after %ss and was killed: %s", self.batch_command_timeout, cmd)
            raise RuntimeError(f"timed out after {self.batch_command_timeout:g} s: {cmd}") from None
        stderr = err.decode(errors="replace").strip()
        if proc.returncode != 0:
            self.log.error("Command %s exited %s: %s", cmd, proc.returncode, stderr)
            raise RuntimeError(stderr or f"exit status {proc.returncode}")
        return out.decode(errors="replace").strip()

    def _command(self, template: str) -> str:
        subvars = self.get_req_subvars()
        subvars["job_id"] = self.job_id
        return " ".join((format_template(self.exec_prefix, **subvars), format_template(template, **subvars)))

    async def query_job_status(self) -> JobStatus:
        """RUNNING / PENDING from squeue; NOTFOUND only on a positive answer; UNKNOWN otherwise."""
        if not self.job_id:
            self.job_status = ""
            return JobStatus.NOTFOUND
        cmd = self._command(self.batch_query_cmd)
        self.log.debug("Spawner querying job: %s", cmd)
        failed = False
        try:
            self.job_status = await self.run_command(cmd)
        except RuntimeError as e:
            failed = True
            self.job_status = str(e.args[0]) if e.args else ""
        except Exception as e:  # e.g. OSError: the command could not even start
            failed = True
            self.job_status = f"{type(e).__name__}: {e}"
        status = self.job_status.strip()
        if not failed:
            if self.state_isrunning():
                return JobStatus.RUNNING
            if self.state_ispending():
                return JobStatus.PENDING
            if not status or status.split()[0].rstrip("+") in FINISHED_STATES:
                return JobStatus.NOTFOUND  # squeue answered: the job is not (or no longer) there
            self.log.warning("Job %s in a state we do not know: %r (kept)", self.job_id, status)
            return JobStatus.UNKNOWN
        if GONE_RE.search(status) and not re.search(r"Unable to contact|timed out|Socket", status, re.I):
            return JobStatus.NOTFOUND
        self.log.warning("Could not query job %s (state unknown, job kept): %s", self.job_id, status)
        return JobStatus.UNKNOWN

    async def cancel_batch_job(self) -> None:
        """scancel with retries; a job already gone is success; raise after the last failure."""
        cmd = self._command(self.batch_cancel_cmd)
        last = ""
        for attempt in range(1, max(1, self.cancel_retries) + 1):
            self.log.info("Cancelling job %s (attempt %d): %s", self.job_id, attempt, cmd)
            try:
                await self.run_command(cmd)
                return
            except RuntimeError as e:
                last = str(e.args[0]) if e.args else str(e)
                if CANCEL_GONE_RE.search(last):
                    return
            except Exception as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.cancel_retries:
                await asyncio.sleep(self.cancel_retry_delay)
        self.log.error(
            "scancel %s failed %d times, the job may still run: %s", self.job_id, self.cancel_retries, last
        )
        raise RuntimeError(f"could not cancel Slurm job {self.job_id}: {last}")
