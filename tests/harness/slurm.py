"""A real single-node Slurm for tests, started without systemd (see /work/shared/STACK.md).

    with SlurmCluster.started() as slurm:        # ~1-2 s: munged, slurmctld, slurmd; waits for "idle"
        create_unix_user("alice")
        job_id = slurm.sbatch("sleep 600", user="alice", name="jupyterhub-reaper", gres="gpu:1")
        slurm.run(["squeue"])                     # any Slurm command, with SLURM_CONF set
        slurm.env                                 # {"SLURM_CONF": ...}: give it to other processes

Everything lives in one private folder (mode 0755 so that job users can read the config):
its own munge key and munged socket (so it neither needs nor disturbs a system munged), the
slurm.conf and gres.conf, state, spool, pid and log files. The daemons run in the foreground as
children of the harness (slurmctld -D, slurmd -D, munged -F), so `stop()` ends exactly them.
Ports for slurmctld and slurmd are chosen free at start.

The node advertises CPUs=8, RealMemory=16000 and 4 GPUs (SlurmdParameters=config_overrides).
The GPUs are fake: gres.conf lists `File=` entries that are symlinks to /dev/null (Slurm
requires a character device for a GPU gres and binds nothing with task/none), so jobs can
request `--gres=gpu:N` (or `--gpus=N`) with N <= 4 and squeue reports the request as usual.
Partitions: `cpu` (default) and `gpu`, both on the one node.
Job accounting: `JobAcctGatherType=jobacct_gather/linux`, sampled every `acct_frequency` seconds
(default 2), so `sstat` reports the jobs' CPU (no slurmdbd: AccountingStorageType stays none).

Requires root (daemons, useradd) and the Debian packages `slurm-wlm munge`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["SlurmCluster", "SlurmError", "create_unix_user", "missing_parts", "free_port"]

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")
MUNGE_BINARIES = ("munged", "munge")


class SlurmError(RuntimeError):
    """The harness could not start or use the Slurm cluster; the message carries the logs."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )


def missing_parts() -> list[str]:
    """What is missing on this machine to start a real Slurm (empty when everything is here)."""
    missing = [b for b in (*SLURM_BINARIES, *MUNGE_BINARIES) if _which(b) is None]
    if (
        _which("mungekey") is None
        and _which("create-munge-key") is None
        and not Path("/etc/munge/munge.key").exists()
    ):
        missing.append("mungekey")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        missing.append("munge user")
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def free_port() -> int:
    """A TCP port free on all interfaces (Slurm daemons listen on 0.0.0.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def create_unix_user(name: str) -> pwd.struct_passwd:
    """Create a unix user with a home folder (useradd -m); idempotent. Jobs run as this user."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    proc = subprocess.run(
        ["useradd", "-m", "-s", "/bin/bash", name], capture_output=True, text=True, check=False
    )
    # exit 9: the user appeared meanwhile (a parallel test made it): fine.
    if proc.returncode not in (0, 9):
        raise SlurmError(f"useradd {name} failed ({proc.returncode}): {proc.stderr.strip()}")
    return pwd.getpwnam(name)


def short_hostname() -> str:
    """`hostname -s`: the node's name in slurm.conf (slurmd finds its NodeName by it)."""
    return socket.gethostname().split(".")[0]


class SlurmCluster:
    """One single-node Slurm cluster in a private folder. Use `started()` or start()/stop()."""

    def __init__(
        self,
        base: Path | None = None,
        *,
        cpus: int = 8,
        memory_mb: int = 16000,
        gpus: int = 4,
        min_job_age: int = 5,
        acct_frequency: int = 2,
        extra_conf: Sequence[str] = (),
    ) -> None:
        if base is None:
            base = Path(tempfile.mkdtemp(prefix="reaper-slurm-"))
        self.base = base
        self._own_base = True
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.gpus = gpus
        self.min_job_age = min_job_age
        self.acct_frequency = acct_frequency
        self.extra_conf = list(extra_conf)
        self.node = short_hostname()
        self.ctld_port = 0
        self.slurmd_port = 0
        self.conf_path = base / "etc" / "slurm.conf"
        self.munge_dir = base / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.log_dir = base / "log"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # --- environment ---------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Variables every Slurm command needs (give them to the hub's Spawner.environment too)."""
        return {"SLURM_CONF": str(self.conf_path)}

    def full_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        if extra:
            env.update(extra)
        return env

    # --- config ----------------------------------------------------------------------------------
    def _write_config(self) -> None:
        b = self.base
        for d in ("etc", "state", "spool", "log", "dev", "run"):
            (b / d).mkdir(parents=True, exist_ok=True)
        os.chmod(b, 0o755)
        os.chmod(b / "etc", 0o755)
        gres = ""
        if self.gpus > 0:
            for i in range(self.gpus):
                link = b / "dev" / f"fakegpu{i}"
                if not link.is_symlink():
                    link.symlink_to("/dev/null")
            (b / "etc" / "gres.conf").write_text(
                f"# Fake GPUs: symlinks to /dev/null (Slurm wants a character device per GPU).\n"
                f"NodeName={self.node} Name=gpu File={b}/dev/fakegpu[0-{self.gpus - 1}]\n"
            )
            gres = f" Gres=gpu:{self.gpus}"
        lines = [
            "# Written by tests/harness/slurm.py: a single-node test cluster, no systemd.",
            "ClusterName=reaper-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # Our own munged, not the system one (which may be absent or use another key).
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none",
            # CPU accounting for sstat (reaper.batch.slurm.SlurmBatch.cpu_usage): no slurmdbd needed.
            "JobAcctGatherType=jobacct_gather/linux",
            f"JobAcctGatherFrequency=task={self.acct_frequency}",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={b}/log/jobcomp.txt",
            "MpiDefault=none",
            "MailProg=/bin/true",
            # advertise more CPUs/memory/GPUs than the machine has
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            f"MinJobAge={self.min_job_age}",
            "KillWait=3",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            f"StateSaveLocation={b}/state",
            f"SlurmdSpoolDir={b}/spool/slurmd-%n",
            f"SlurmctldPidFile={b}/run/slurmctld.pid",
            f"SlurmdPidFile={b}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={b}/log/slurmctld.log",
            f"SlurmdLogFile={b}/log/slurmd.log",
            *(["GresTypes=gpu"] if self.gpus > 0 else []),
            *self.extra_conf,
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb}{gres} State=UNKNOWN",
            f"PartitionName=cpu Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            f"PartitionName=gpu Nodes={self.node} MaxTime=INFINITE State=UP",
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")
        os.chmod(self.conf_path, 0o644)
        (b / "spool" / f"slurmd-{self.node}").mkdir(parents=True, exist_ok=True)

    def broken_conf(self, kind: str = "dead-controller") -> Path:
        """A second config for failure tests.

        kind="dead-controller": the same cluster, but slurmctld's port is one nobody listens on
        (commands fail fast with "Unable to contact slurm controller (connect failure)").
        kind="unparsable": a config Slurm refuses to read ("Unable to process configuration file").
        """
        d = self.base / f"broken-{kind}"
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o755)
        path = d / "slurm.conf"
        if kind == "dead-controller":
            text = self.conf_path.read_text().replace(
                f"SlurmctldPort={self.ctld_port}", f"SlurmctldPort={free_port()}"
            )
            text += "MessageTimeout=2\n"
            if (self.base / "etc" / "gres.conf").exists():
                shutil.copy(self.base / "etc" / "gres.conf", d / "gres.conf")
        elif kind == "unparsable":
            text = "ClusterName=broken\nThisIsNotASlurmKey=1\n"
        else:
            raise ValueError(kind)
        path.write_text(text)
        os.chmod(path, 0o644)
        return path

    # --- munge -------------------------------------------------------------------------------------
    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        os.chmod(self.munge_dir, 0o755)  # clients (job users) must reach the socket
        key = self.munge_dir / "munge.key"
        if not key.exists():
            mungekey = _which("mungekey")
            if mungekey:  # munge >= 0.5.14
                self._check_run([mungekey, "--create", f"--keyfile={key}"], "mungekey")
            else:  # older munge: the system key, made by create-munge-key if needed
                system_key = Path("/etc/munge/munge.key")
                if not system_key.exists():
                    self._check_run(
                        [_which("create-munge-key") or "create-munge-key", "-f"], "create-munge-key"
                    )
                shutil.copy(system_key, key)
            os.chown(key, munge.pw_uid, munge.pw_gid)
            os.chmod(key, 0o600)
        log = open(self.log_dir / "munged.out", "ab")  # noqa: SIM115 (kept by the child)
        self._procs["munged"] = subprocess.Popen(
            [
                _which("munged") or "munged",
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--log-file={self.munge_dir / 'munged.log'}",
                f"--pid-file={self.munge_dir / 'munged.pid'}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
            ],
            user=munge.pw_uid,
            group=munge.pw_gid,
            extra_groups=[],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(self.munge_dir),
        )
        log.close()
        self._wait(
            lambda: self._proc_alive("munged") and self.munge_socket.exists(),
            10,
            "munged did not create its socket",
        )

    @staticmethod
    def _check_run(cmd: Sequence[str], what: str) -> None:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SlurmError(f"{what} failed ({proc.returncode}): {proc.stderr.strip()}")

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> SlurmCluster:
        missing = missing_parts()
        if missing:
            raise SlurmError(f"cannot start Slurm: missing {', '.join(missing)}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ctld_port = free_port()
        self.slurmd_port = free_port()
        while self.slurmd_port == self.ctld_port:
            self.slurmd_port = free_port()
        self._write_config()
        try:
            self._start_munge()
            self._spawn("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-f", str(self.conf_path)])
            self._wait(lambda: self._ping_ctld(), timeout / 2, "slurmctld did not answer")
            self._spawn(
                "slurmd",
                [_which("slurmd") or "slurmd", "-D", "-N", self.node, "-f", str(self.conf_path)],
            )
            self._wait(lambda: self.node_state() == "idle", timeout / 2, "the node did not become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.log_dir / f"{name}.out", "ab")  # noqa: SIM115
        self._procs[name] = subprocess.Popen(
            cmd,
            env=self.full_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(self.base),
        )
        log.close()

    def _proc_alive(self, name: str) -> bool:
        p = self._procs.get(name)
        return p is not None and p.poll() is None

    def _wait(self, ok: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():  # type: ignore[operator]
                return
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited with {p.returncode}\n{self.logs()}")
            time.sleep(0.2)
        raise SlurmError(f"{what} within {timeout:.0f} s\n{self.logs()}")

    def _ping_ctld(self) -> bool:
        r = self.run(["scontrol", "ping"], timeout=10)
        return r.returncode == 0 and "UP" in r.stdout

    def node_state(self) -> str:
        r = self.run(["sinfo", "--noheader", "-N", "-n", self.node, "-o", "%T"], timeout=10)
        return (
            r.stdout.strip().splitlines()[0].rstrip("*~#") if r.returncode == 0 and r.stdout.strip() else ""
        )

    def cancel_all(self, timeout: float = 20) -> None:
        """Cancel every job and wait until none is left running or completing."""
        r = self.run(["squeue", "--noheader", "-o", "%i"], timeout=15)
        ids = r.stdout.split() if r.returncode == 0 else []
        if ids:
            self.run(["scancel", *ids], timeout=15)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.run(["squeue", "--noheader", "-o", "%i"], timeout=15)
            if r.returncode != 0 or not r.stdout.strip():
                return
            time.sleep(0.3)

    def stop(self, timeout: float = 15) -> None:
        """Cancel all jobs, then stop slurmd, slurmctld and munged (SIGTERM, then SIGKILL)."""
        if self._proc_alive("slurmctld") and self._proc_alive("slurmd"):
            with contextlib.suppress(Exception):
                self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            p = self._procs.get(name)
            if p is None or p.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self._procs.clear()

    def stop_controller(self) -> None:
        """Stop slurmctld only (to test commands against a controller that is down)."""
        p = self._procs.pop("slurmctld", None)
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(15)

    def start_controller(self, timeout: float = 30) -> None:
        if self._proc_alive("slurmctld"):
            return
        self._spawn("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-f", str(self.conf_path)])
        self._wait(lambda: self._ping_ctld(), timeout, "slurmctld did not answer after restart")

    @classmethod
    @contextlib.contextmanager
    def started(cls, base: Path | None = None, **kwargs: object) -> Iterator[SlurmCluster]:
        cluster = cls(base, **kwargs)  # type: ignore[arg-type]
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()
            if base is None:
                shutil.rmtree(cluster.base, ignore_errors=True)

    # --- using it ------------------------------------------------------------------------------------
    def run(
        self,
        cmd: Sequence[str],
        *,
        user: str | None = None,
        input: str | None = None,
        timeout: float = 30,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command with SLURM_CONF set, as root or (via runuser) as `user`."""
        full = list(cmd)
        e = self.full_env(env)
        if user is not None:
            full = ["runuser", "-u", user, "--", "env", f"SLURM_CONF={e['SLURM_CONF']}", *full]
            cwd = cwd or pwd.getpwnam(user).pw_dir
        return subprocess.run(
            full,
            env=e,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=cwd or str(self.base),
        )

    def sbatch(
        self,
        command: str,
        *,
        user: str,
        name: str = "jupyterhub-reaper",
        partition: str | None = None,
        gres: str | None = None,
        time_limit: str | None = None,
        mem: str | None = None,
        cpus: int | None = None,
        extra: Sequence[str] = (),
    ) -> str:
        """Submit `command` (a shell line) as `user`; returns the job id."""
        args = ["sbatch", "--parsable", f"--job-name={name}", "--output=/dev/null"]
        if partition:
            args.append(f"--partition={partition}")
        if gres:
            args.append(f"--gres={gres}")
        if time_limit:
            args.append(f"--time={time_limit}")
        if mem:
            args.append(f"--mem={mem}")
        if cpus:
            args.append(f"--cpus-per-task={cpus}")
        args.extend(extra)
        args.extend(["--wrap", command])
        r = self.run(args, user=user)
        if r.returncode != 0:
            raise SlurmError(f"sbatch failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip().splitlines()[-1].split(";")[0]

    def squeue_state(self, job_id: str) -> str | None:
        """The job's state per `squeue -t all`, or None when Slurm no longer knows it."""
        r = self.run(["squeue", "--noheader", "-t", "all", "-j", job_id, "-o", "%T"])
        if r.returncode != 0:
            if "Invalid job id" in r.stderr:
                return None
            raise SlurmError(f"squeue failed: {r.stderr.strip()}")
        return r.stdout.strip() or None

    def wait_state(self, job_id: str, states: Sequence[str | None], timeout: float = 30) -> str | None:
        deadline = time.monotonic() + timeout
        state = self.squeue_state(job_id)
        while state not in states and time.monotonic() < deadline:
            time.sleep(0.2)
            state = self.squeue_state(job_id)
        if state not in states:
            raise SlurmError(f"job {job_id} is {state}, not one of {list(states)} after {timeout} s")
        return state

    def logs(self, lines: int = 40) -> str:
        out = []
        for path in sorted(self.log_dir.glob("*")) + [self.munge_dir / "munged.log"]:
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(out)
