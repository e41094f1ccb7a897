"""Benchmark runner: our sweep and jupyterhub-idle-culler 2.0.0 against the same hub simulator.

    python -m benchmarks.run                      # every scenario, both tools
    python -m benchmarks.run --scenarios 1 --tools culler --n 100 --n 1000
    python -m benchmarks.run --scenarios 1 --scale-culler 100   # culler at N=100, extrapolated

For each (scenario, N, tool) the simulator (benchmarks.hubsim) starts afresh in its own process, so
its CPU is never counted as the tool's; the tool runs as a child process too and is measured with
os.wait4: wall time, CPU (user + system) and peak RSS of that process alone. The simulator's counters
give the requests by route and the stops (with the category of each stopped server: stopping an
active or computing server is harm and is shown as such).

jupyterhub-idle-culler has no one-shot option (``--cull-every`` only sets its PeriodicCallback), so
the child runs ``jupyterhub_idle_culler.cull_idle`` once with the settings its own IdleCuller
application parsed from the same command line: exactly what each of its periodic runs does.

Internal entry points (children): ``python -m benchmarks.run culler-once --url=... --timeout=...``
and ``python -m benchmarks.run ours-once --api-url ... --n ...``; the token comes in the environment
(JUPYTERHUB_API_TOKEN), never on a command line.

Only the standard library is imported at module level, so the children pay only for their own tool.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PY = sys.executable
OURS_STOP_CONCURRENCY = 64
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ scenarios


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    sizes: tuple[int, ...]
    hub_latency: float = 0.005
    user_latency: float = 0.0
    stop_time: float = 0.0
    population: dict[str, Any] = field(default_factory=dict)
    idle_limit_s: int = 3600  # the culler's --timeout, and our detached stop threshold
    culler_scale: int | None = None  # default N for the culler's side (extrapolated), if slow
    warmup_s: int = 2400  # our previous sweep ran this long ago (its final notices are that old)
    cold: bool = False  # "from cold": each tool as a user meets it, from its start (run_cold_*)

    def sim_args(self, n: int) -> list[str]:
        args = [
            f"--users={n}",
            f"--hub-latency={self.hub_latency}",
            f"--user-latency={self.user_latency}",
            f"--stop-time={self.stop_time}",
        ]
        pop = {"idle_detached": 0.0, **self.population}
        for k in ("active", "idle_attached", "idle_detached", "computing", "named_share"):
            if k in pop:
                args.append(f"--{k.replace('_', '-')}={pop[k]}")
        if "idle_hours" in pop:
            lo, hi = pop["idle_hours"]
            args += ["--idle-hours", str(lo), str(hi)]
        if "seed" in pop:
            args.append(f"--seed={pop['seed']}")
        if pop.get("staff") is False:
            args.append("--no-staff")
        return args


SCENARIOS: dict[str, Scenario] = {
    "1": Scenario(
        "1",
        "Slurm-realistic reap: all idle-detached, hub 5 ms, stop 1 s",
        (1000,),
        stop_time=1.0,
        population={"idle_detached": 1.0},
        culler_scale=100,
    ),
    "2": Scenario(
        "2",
        "Big hub, all idle: hub 5 ms, instant stops",
        (10000,),
        population={"idle_detached": 1.0},
    ),
    "3": Scenario(
        "3",
        "Big hub, steady state: 95 % active, 2.5 % hidden tabs, 2.5 % idle < 30 min",
        (10000,),
        population={
            "active": 0.95,
            "idle_attached": 0.025,
            "idle_detached": 0.025,
            "idle_hours": (0.25, 0.5),
        },
        warmup_s=300,  # the previous sweep, one sweep_every ago
    ),
    "4": Scenario(
        "4",
        "Linear cost: all idle, hub 5 ms, instant stops",
        (1000, 5000, 10000),
        population={"idle_detached": 1.0},
    ),
    "5": Scenario(
        "5",
        "From cold, shipped config.yaml: all idle-detached 4-8 h (past the shipped 3 h), hub 5 ms, stop 1 s",
        (1000,),
        stop_time=1.0,
        population={"idle_detached": 1.0, "idle_hours": (4.0, 8.0), "staff": False},  # staff are exempt
        idle_limit_s=3 * 3600,  # the culler's --timeout: the shipped detached stop_after
        culler_scale=100,
        cold=True,
    ),
}


# ------------------------------------------------------------------------------------ measuring


@dataclass
class Measure:
    tool: str
    scenario: str
    n: int  # the N the row stands for
    ran_n: int  # the N actually run (differs when extrapolated)
    wall_s: float
    cpu_s: float
    rss_mb: float
    rc: int
    requests: dict[str, int]
    stops_completed: int
    stopped_categories: dict[str, int]
    inner: dict[str, Any] = field(default_factory=dict)  # what the child reported about itself
    note: str = ""

    @property
    def sweep_s(self) -> float:
        """Wall of the cull / sweep itself, measured in the child (no interpreter start, no imports)."""
        return float(self.inner.get("sweep_s", self.wall_s))

    @property
    def sweep_cpu_s(self) -> float:
        return float(self.inner.get("sweep_cpu_s", self.cpu_s))

    @property
    def scale(self) -> float:
        return self.n / self.ran_n if self.ran_n else 1.0

    def scaled(self) -> Measure:
        """Linear extrapolation to n (wall, CPU, requests, stops); RSS as measured."""
        if self.ran_n == self.n:
            return self
        f = self.scale
        return Measure(
            tool=self.tool,
            scenario=self.scenario,
            n=self.n,
            ran_n=self.ran_n,
            wall_s=self.wall_s * f,
            cpu_s=self.cpu_s * f,
            rss_mb=self.rss_mb,
            rc=self.rc,
            requests={k: round(v * f) for k, v in self.requests.items()},
            stops_completed=round(self.stops_completed * f),
            stopped_categories={k: round(v * f) for k, v in self.stopped_categories.items()},
            inner={
                **self.inner,
                **{k: self.inner[k] * f for k in ("sweep_s", "sweep_cpu_s") if k in self.inner},
            },
            note=f"extrapolated ×{f:g} from N={self.ran_n} (RSS as measured)",
        )


class Sim:
    """The simulator in its own process."""

    def __init__(self, args: Sequence[str], workdir: Path) -> None:
        self.err = open(workdir / "hubsim.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PY, "-m", "benchmarks.hubsim", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(5)
            raise RuntimeError(f"hubsim did not start: see {workdir / 'hubsim.log'}")
        self.info: dict[str, Any] = json.loads(line)
        self.url: str = self.info["url"]
        self.api_url: str = self.info["api_url"]
        self.token: str = self.info["token"]

    def stats(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(self.url + "/sim/stats", timeout=60) as r:
            data: dict[str, Any] = json.load(r)
            return data

    def reset(self, repopulate: bool = False) -> None:
        import urllib.request

        q = "?repopulate=1" if repopulate else ""
        req = urllib.request.Request(self.url + "/sim/reset" + q, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


def measure_child(
    cmd: Sequence[str], env: dict[str, str], timeout: float, log_path: Path
) -> tuple[float, float, float, int, str]:
    """Run cmd; return (wall s, CPU s, peak RSS MB, returncode, stdout) of that child alone."""
    with open(log_path, "w") as err, tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                wall = time.perf_counter() - t0
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                wall = time.perf_counter() - t0
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4 already
        out.seek(0)
        stdout = out.read()
    cpu = ru.ru_utime + ru.ru_stime
    rss_mb = ru.ru_maxrss / 1024.0  # Linux: KiB
    return wall, cpu, rss_mb, proc.returncode, stdout


def _last_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return {}


def _stopped_categories(stats: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in stats.get("stops", []):
        if s.get("completed") is not None:
            cat = s.get("category") or "?"
            out[cat] = out.get(cat, 0) + 1
    return out


def _max_parallel(stats: dict[str, Any]) -> int:
    """The most stops in progress at once (from request arrival to completion)."""
    events: list[tuple[float, int]] = []
    for st in stats.get("stops", []):
        end = st.get("completed") or st.get("answered")
        if end is not None:
            events += [(st["requested"], 1), (end, -1)]
    cur = best = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        cur += d
        best = max(best, cur)
    return best


def _finish(
    tool: str,
    sc: Scenario,
    n: int,
    ran_n: int,
    sim: Sim,
    res: tuple[float, float, float, int, str],
    settle_s: float,
) -> Measure:
    wall, cpu, rss, rc, stdout = res
    # stops answered 202 finish in the background: let them, within the slow-stop horizon
    deadline = time.monotonic() + settle_s
    stats = sim.stats()
    while stats["stops_completed"] < stats["stops_requested"] and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = sim.stats()
    return Measure(
        tool=tool,
        scenario=sc.key,
        n=n,
        ran_n=ran_n,
        wall_s=wall,
        cpu_s=cpu,
        rss_mb=rss,
        rc=rc,
        requests=stats["requests"],
        stops_completed=stats["stops_completed"],
        stopped_categories=_stopped_categories(stats),
        inner={**_last_json(stdout), "max_parallel_stops": _max_parallel(stats)},
    )


def child_env(sim: Sim) -> dict[str, str]:
    env = dict(os.environ)
    env["JUPYTERHUB_API_TOKEN"] = sim.token
    env["JUPYTERHUB_API_URL"] = sim.api_url
    env.pop("JUPYTERHUB_SERVICE_NAME", None)
    return env


def run_culler(sim: Sim, sc: Scenario, n: int, ran_n: int, workdir: Path, timeout: float) -> Measure:
    """jupyterhub-idle-culler 2.0.0 with its defaults (concurrency 10, hub page size) and
    --timeout = the scenario's idle limit; one cull, as each of its periodic runs."""
    cmd = [PY, "-m", "benchmarks.run", "culler-once", f"--url={sim.api_url}", f"--timeout={sc.idle_limit_s}"]
    res = measure_child(cmd, child_env(sim), timeout, workdir / f"culler-{sc.key}-{ran_n}.log")
    return _finish("culler", sc, n, ran_n, sim, res, settle_s=30.0)


async def run_ours(
    sim_url: str,
    token: str,
    n: int,
    *,
    idle_limit_s: int = 3600,
    warmup_s: int = 2400,
    stop_concurrency: int = 64,
    workdir: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Our sweep against the simulator, in THIS process (the child side of ``ours-once``).

    A long-running service has swept before: a warm-up sweep runs with its clock ``warmup_s``
    earlier (its notices, sent to the log channel, are then ``warmup_s`` old), the simulator's
    counters are reset, and the measured sweep runs at the real time with the same Sweeper, store and
    client. Policy: detached servers warned after idle_limit/2, stopped after idle_limit, 30 min of
    notice; the safety limits are raised so that a sweep may stop every server (the benchmark reaps
    a whole hub on purpose). Returns the measured sweep's wall and CPU (in-process) and its summary.
    """
    import asyncio
    import logging
    import resource
    import urllib.request
    from datetime import UTC, datetime, timedelta

    from reaper.config import Settings
    from reaper.service import make_hub_client, make_outbox, tune_gc
    from reaper.store import Store
    from reaper.sweep import Sweeper

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for module in filter(None, os.environ.get("BENCH_IMPORT", "").split(",")):  # e.g. reaper.web.app
        importlib.import_module(module)
    folder = Path(workdir or tempfile.mkdtemp(prefix="reaper-bench-ours-"))
    db = folder / f"ours-{n}-{os.getpid()}.sqlite"
    half = max(idle_limit_s // 2, 60)
    config: dict[str, Any] = {
        "hub": {
            "api_url": sim_url.rstrip("/") + "/hub/api"
            if not sim_url.rstrip("/").endswith("/hub/api")
            else sim_url
        },
        "database_url": f"sqlite:///{db}",
        "log_level": "WARNING",
        "safety": {
            "max_stops_per_sweep": 10 * n + 10,
            "max_stop_fraction": 1.0,
            "stop_concurrency": stop_concurrency,
        },
        "defaults": {
            "detached": {"warn_after": f"{half}s", "stop_after": f"{idle_limit_s}s"},
            "min_notice": "30m",
            "channels": ["log"],
        },
    }
    if os.environ.get("BENCH_OURS_CONFIG"):  # e.g. '{"probe": {"confirm_with_status": false}}'
        overrides = {**json.loads(os.environ["BENCH_OURS_CONFIG"]), **(overrides or {})}
    for k, v in (overrides or {}).items():
        config[k] = v
    os.environ["JUPYTERHUB_API_TOKEN"] = token
    settings = Settings.model_validate(config)
    store = await asyncio.to_thread(lambda: Store.open(settings.database_url, isolated=True))  # as the service
    hub = make_hub_client(settings)
    public = settings.hub.effective_api_url().removesuffix("/hub/api")
    offset = timedelta(seconds=warmup_s)
    shifted = {"on": True}

    def clock() -> datetime:
        now = datetime.now(UTC)
        return now - offset if shifted["on"] else now

    if os.environ.get("BENCH_TRACEMALLOC"):  # diagnostics: where the memory goes
        import tracemalloc

        tracemalloc.start(1)
    web_server = None
    try:
        outbox = make_outbox(settings, store)
        sweeper = Sweeper(settings, hub, store, notifier=outbox, clock=clock, keep_rows=False)  # as the service
        if not os.environ.get("BENCH_NO_WEB"):
            # the page, built and listening as the managed service serves it (reaper.web.app.start_web):
            # the running service's memory, not the sweeping core's alone
            from types import SimpleNamespace

            from tornado.httpserver import HTTPServer

            from reaper.web.app import make_app

            page = SimpleNamespace(settings=settings, store=store, hub=hub, sweeper=sweeper, outbox=outbox,
                                   last_result=None)
            web_server = HTTPServer(make_app(page, prefix="/services/reaper/"), xheaders=True)
            web_server.listen(0, address="127.0.0.1")
        if not os.environ.get("BENCH_NO_TUNE_GC"):
            tune_gc()  # as the service does at start (reaper.service.run_service)
        rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports, store, clients
        warm = await sweeper.run_once(dry_run=False)
        # setup, not measured: deliver every queued notice (one drain delivers a bounded batch)
        for _ in range(10 * n + 10):
            if not await outbox.drain(clock()):
                break
        shifted["on"] = False
        rss_warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        req = urllib.request.Request(public + "/sim/reset", method="POST")
        await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=60).read())
        prof = None
        if os.environ.get("BENCH_PROFILE"):
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        gc_time = [0.0, 0.0, 0]  # seconds in the collector, start of the current collection, collections

        def _gc_cb(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                gc_time[1] = time.perf_counter()
            else:
                gc_time[0] += time.perf_counter() - gc_time[1]
                gc_time[2] += 1

        import gc

        gc.callbacks.append(_gc_cb)
        ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        res = await sweeper.run_once(dry_run=False)
        wall = time.perf_counter() - t0
        if prof is not None:
            prof.disable()
            prof.dump_stats(os.environ["BENCH_PROFILE"])
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        gc.callbacks.remove(_gc_cb)
        if os.environ.get("BENCH_TRACEMALLOC"):
            snap = tracemalloc.take_snapshot()
            cur, peak = tracemalloc.get_traced_memory()
            print(f"tracemalloc: now {cur / 2**20:.1f} MB, peak {peak / 2**20:.1f} MB", file=sys.stderr)
            for st in snap.statistics("lineno")[:25]:
                print(st, file=sys.stderr)
    finally:
        if web_server is not None:
            web_server.stop()
        await hub.aclose()
        await asyncio.to_thread(store.close)
    return {
        "sweep_s": round(wall, 3),
        "sweep_cpu_s": round((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime), 3),
        "gc": {"seconds": round(gc_time[0], 3), "collections": gc_time[2]},
        "rss_start_mb": round(rss_start, 1),
        "rss_after_warmup_mb": round(rss_warm, 1),
        "rss_after_sweep_mb": round(ru1.ru_maxrss / 1024, 1),
        "group_commits": {
            name: {"batches": g.batches, "items": g.items, "busy_s": round(g.busy, 3)}
            for name, g in (("intents", sweeper._intents),
                            ("delivered", outbox._delivered))
        },
        "warmup": warm.summary(),
        "summary": res.summary(),
        "actions": _actions(res),
        "warmup_actions": _actions(warm),
    }


def _actions(res: Any) -> dict[str, Any]:
    """Decisions of a sweep by action, with one sample reason each (for the README and debugging)."""
    return {a: {"count": n, "sample": reason} for a, (n, reason) in res.actions.items()}


def run_ours_measured(sim: Sim, sc: Scenario, n: int, workdir: Path, timeout: float) -> Measure:
    cmd = [
        PY,
        "-m",
        "benchmarks.run",
        "ours-once",
        f"--api-url={sim.api_url}",
        f"--n={n}",
        f"--idle-limit={sc.idle_limit_s}",
        f"--workdir={workdir}",
        f"--warmup={sc.warmup_s}",
        f"--stop-concurrency={OURS_STOP_CONCURRENCY}",
    ]
    res = measure_child(cmd, child_env(sim), timeout, workdir / f"ours-{sc.key}-{n}.log")
    return _finish("ours", sc, n, n, sim, res, settle_s=30.0)


# ------------------------------------------------------------------------- scenario 5: from cold

SHIPPED_CONFIG = ROOT / "config.yaml"


def _free_port() -> int:
    import socket

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return int(so.getsockname()[1])


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def cold_config(smtp_port: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shipped config.yaml as it is, but for what the simulator cannot be: its mail relay is
    the runner's SMTP sink on a free port (localhost:25 is the shipped one), and ``batch.system:
    none`` (the simulator has no Slurm jobs, and this machine's real Slurm runs other people's
    jobs: the guard must not touch them). The hub's address and token come from the environment,
    as the hub gives them to its managed services. ``overrides`` (BENCH_COLD_CONFIG, JSON): a
    variant, always named in the row."""
    import yaml

    data: dict[str, Any] = yaml.safe_load(SHIPPED_CONFIG.read_text())
    data = _merge(data, {"notify": {"email": {"port": smtp_port}}, "batch": {"system": "none"}})
    return _merge(data, overrides or {})


class SmtpSink:
    """Accepts every message on 127.0.0.1 and keeps the time each arrived (aiosmtpd, in a thread)."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        sink = self
        self.times: list[float] = []

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                sink.times.append(time.time())
                return "250 OK"

        self.port = _free_port()
        self._ctl = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self._ctl.start()

    def stop(self) -> None:
        self._ctl.stop()


def _wait_stopped(sim: Sim, n: int, deadline: float, proc: subprocess.Popen[str] | None = None,
                  give_up: Path | None = None) -> dict[str, Any]:
    """Poll the simulator until n stops completed (or the deadline, or ``give_up``'s text in the
    log: the safety limit held the stops)."""
    while True:
        stats = sim.stats()
        if stats["stops_completed"] >= n or time.time() > deadline:
            return stats
        if proc is not None and proc.poll() is not None:
            return stats
        if give_up is not None and "SAFETY LIMIT" in give_up.read_text(errors="replace"):
            time.sleep(2.0)  # (the sweep's end)
            return sim.stats()
        time.sleep(0.5)


def _end(proc: subprocess.Popen[str], sig: int) -> tuple[float, float, int]:
    """Signal the child and reap it: (CPU s, peak RSS MB, exit code)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, status, ru = os.wait4(proc.pid, 0)
        rc = os.waitstatus_to_exitcode(status)
    except ChildProcessError:  # already reaped by poll()
        return 0.0, 0.0, proc.returncode
    proc.returncode = rc
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024.0, rc


def _cold_measure(tool: str, sc: Scenario, n: int, ran_n: int, sim: Sim, t0: float, stats: dict[str, Any],
                  cpu: float, rss: float, rc: int, inner: dict[str, Any], note: str = "") -> Measure:
    """Wall: from the tool's start to its last stop completed ("from due": to the same from the
    moment its first stop went out). Extrapolated culler runs scale the stop phase only."""
    first, last = stats.get("first_stop_requested"), stats.get("last_stop_completed")
    done = stats["stops_completed"]
    f = n / ran_n
    if first is not None and last is not None and done >= ran_n:
        stopping = (last - first) * f
        wall = (first - t0) + stopping
    else:
        stopping = float("nan")
        wall = time.time() - t0
    inner = {**inner, "sweep_s": round(wall, 3), "start_to_first_stop_s": round(first - t0, 3) if first else None,
             "stop_phase_s": round(stopping, 3), "sweep_cpu_s": round(cpu * (f if tool == "culler" else 1), 3),
             "max_parallel_stops": _max_parallel(stats)}
    return Measure(tool=tool, scenario=sc.key, n=n, ran_n=ran_n, wall_s=wall, cpu_s=cpu * f if tool == "culler"
                   else cpu, rss_mb=rss, rc=rc,
                   requests={k: round(v * f) for k, v in stats["requests"].items()},
                   stops_completed=round(done * f), stopped_categories={
                       k: round(v * f) for k, v in _stopped_categories(stats).items()},
                   inner=inner, note=note)


def run_cold_culler(sim: Sim, sc: Scenario, n: int, ran_n: int, workdir: Path, timeout: float) -> Measure:
    """jupyterhub-idle-culler as the hub starts it (``python -m jupyterhub_idle_culler``, its first
    cull at start), --timeout the shipped stop_after: from its start to every server stopped."""
    cmd = [PY, "-m", "jupyterhub_idle_culler", f"--url={sim.api_url}", f"--timeout={sc.idle_limit_s}"]
    with open(workdir / f"cold-culler-{ran_n}.log", "w") as err:
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(sim), stdout=err, stderr=err, text=True)
        stats = _wait_stopped(sim, ran_n, t0 + timeout, proc)
        cpu, rss, rc = _end(proc, signal.SIGTERM)
    note = f"extrapolated ×{n / ran_n:g} from N={ran_n}: the stop phase (RSS as measured)" if ran_n != n else ""
    return _cold_measure("culler", sc, n, ran_n, sim, t0, stats, cpu, rss, 0 if rc in (0, -15, 143) else rc,
                         {}, note)


def _first_final_delivered(db: Path) -> float | None:
    """The first final notice's delivered_at (epoch seconds) in the reaper's SQLite database."""
    import sqlite3
    from datetime import UTC, datetime

    try:
        with sqlite3.connect(db) as con:
            (value,) = con.execute("SELECT min(delivered_at) FROM reaper_notices WHERE kind = 'final'").fetchone()
    except sqlite3.Error:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp() if value else None


def run_cold_ours(sim: Sim, sc: Scenario, n: int, workdir: Path, timeout: float) -> Measure:
    """The service as the hub starts it (``python -m reaper.cli run``) with the shipped
    config.yaml (cold_config), a fresh database, its page served: from its start (migrations,
    first sweep: the final notices, e-mailed to the sink) through min_notice to every server
    stopped."""
    overrides = json.loads(os.environ.get("BENCH_COLD_CONFIG") or "{}")
    folder = Path(tempfile.mkdtemp(prefix="cold-", dir=workdir))
    sink = SmtpSink()
    import yaml

    (folder / "config.yaml").write_text(yaml.safe_dump(cold_config(sink.port, overrides)))
    env = child_env(sim)
    env["JUPYTERHUB_SERVICE_URL"] = f"http://127.0.0.1:{_free_port()}/services/reaper/"
    env["JUPYTERHUB_SERVICE_PREFIX"] = "/services/reaper/"
    env["JUPYTERHUB_PUBLIC_URL"] = sim.url
    # this tree's code, not the installed one (the service runs in its own folder, for its database)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    log_path = workdir / f"cold-ours-{n}.log"
    cmd = [PY, "-m", "reaper.cli", "run", "--config", str(folder / "config.yaml")]
    try:
        with open(log_path, "w") as err:
            t0 = time.time()
            proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=err, stderr=err, text=True)
            stats = _wait_stopped(sim, n, t0 + timeout, proc, give_up=log_path)
            cpu, rss, rc = _end(proc, signal.SIGTERM)
    finally:
        sink.stop()
    mails = sink.times
    from reaper.units import parse_duration

    notice = parse_duration(cold_config(0, overrides)["defaults"]["min_notice"]).total_seconds()
    last = sim.stats().get("last_stop_completed")
    delivered = _first_final_delivered(folder / "reaper.sqlite")
    inner = {"mails": len(mails),
             "min_notice_s": notice,
             # from the moment the first stops fell due (the first final notice's delivered_at, as
             # the reaper recorded it, + min_notice) to the last stop done
             "due_to_done_s": round(last - (delivered + notice), 3) if delivered and last else None,
             "first_mail_s": round(mails[0] - t0, 3) if mails else None,
             "last_mail_s": round(mails[-1] - t0, 3) if mails else None,
             "safety_tripped": "SAFETY LIMIT" in log_path.read_text(errors="replace"),
             "overrides": overrides}
    note = f"shipped config + {json.dumps(overrides, separators=(',', ':'))}" if overrides else "shipped config"
    if inner["safety_tripped"]:
        note += "; SAFETY LIMIT: stops held"
    return _cold_measure("ours", sc, n, n, sim, t0, stats, cpu, rss, 0 if rc in (0, -15, 143) else rc, inner,
                         note)


# -------------------------------------------------------------------------------------- report

_SHORT = {
    "hub GET /hub/api/": "GET /",
    "hub GET /hub/api/users": "users",
    "hub GET /hub/api/users/{name}": "user",
    "hub DELETE /hub/api/users/{name}/server": "DELETE",
    "hub DELETE /hub/api/users/{name}/servers/{server}": "DELETE named",
    "hub GET /hub/api/proxy": "proxy",
}


def short_routes(requests: dict[str, int]) -> str:
    merged: dict[str, int] = {}
    for k, v in requests.items():
        if k in _SHORT:
            name = _SHORT[k]
        else:  # "direct GET /user/{name}/{server}/api/status" -> "direct status"
            where, _, rest = k.partition(" ")
            name = f"{where} {rest.rsplit('/', 1)[-1]}"
        merged[name] = merged.get(name, 0) + v
    return ", ".join(f"{k} {v}" for k, v in sorted(merged.items(), key=lambda kv: -kv[1]))


def table(rows: list[Measure]) -> str:
    head = (
        "scenario",
        "N",
        "tool",
        "sweep wall s",
        "sweep CPU s",
        "process wall s",
        "process CPU s",
        "peak RSS MB",
        "hub req",
        "requests by route",
        "stops done",
        "stopped (category)",
        "ours/culler wall",
        "ours/culler CPU",
    )
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key: dict[tuple[str, int], dict[str, Measure]] = {}
    for m in rows:
        by_key.setdefault((m.scenario, m.n), {})[m.tool] = m
    for m in rows:
        pair = by_key[(m.scenario, m.n)]
        ratio_w = ratio_c = ""
        if m.tool == "ours" and "culler" in pair:
            c = pair["culler"]
            ratio_w = (
                f"{m.sweep_s / c.sweep_s:.3f} ({c.sweep_s / m.sweep_s:.1f}× faster)" if m.sweep_s else ""
            )
            ratio_c = f"{m.sweep_cpu_s / c.sweep_cpu_s:.2f}" if c.sweep_cpu_s else ""
        tool = m.tool + (f" ({m.note})" if m.note else "") + ("" if m.rc == 0 else f" [exit {m.rc}]")
        hub = sum(v for k, v in m.requests.items() if k.startswith("hub "))
        cats = ", ".join(f"{k} {v}" for k, v in sorted(m.stopped_categories.items())) or "-"
        out.append(
            "| "
            + " | ".join(
                [
                    m.scenario,
                    str(m.n),
                    tool,
                    f"{m.sweep_s:.2f}",
                    f"{m.sweep_cpu_s:.2f}",
                    f"{m.wall_s:.2f}",
                    f"{m.cpu_s:.2f}",
                    f"{m.rss_mb:.0f}",
                    str(hub),
                    short_routes(m.requests),
                    str(m.stops_completed),
                    str(m.inner.get("max_parallel_stops", "")),
                    cats,
                    ratio_w,
                    ratio_c,
                ]
            )
            + " |"
        )
    return "\n".join(out)


def cold_table(rows: list[Measure]) -> str:
    """Scenario 5's own table: each tool from its start, and from its first stop ("from due")."""
    head = ("N", "tool", "start → all stopped s", "start → first stop s", "stop phase s", "due → all stopped s",
            "mails (first–last s)",
            "CPU s", "peak RSS MB", "stops done (max parallel)", "culler/ours from start",
            "culler (start → done) / ours (due → done)")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    culler = {m.n: m for m in rows if m.scenario == "5" and m.tool == "culler"}
    for m in rows:
        if m.scenario != "5":
            continue
        i, c = m.inner, culler.get(m.n)
        mails = f"{i['mails']} ({i['first_mail_s']}–{i['last_mail_s']})" if i.get("mails") else "–"
        r_all = r_stop = ""
        if m.tool == "ours" and c is not None and m.stops_completed >= m.n:
            r_all = f"{c.sweep_s / m.sweep_s:.2f}×"
            due = i.get("due_to_done_s") or i["stop_phase_s"]
            r_stop = f"{c.inner['stop_phase_s'] / due:.1f}×" if due else ""
        tool = m.tool + (f" ({m.note})" if m.note else "") + ("" if m.rc == 0 else f" [exit {m.rc}]")
        out.append("| " + " | ".join([
            str(m.n), tool, f"{m.sweep_s:.1f}", str(i.get("start_to_first_stop_s")), f"{i['stop_phase_s']:.1f}",
            str(i.get("due_to_done_s", "–")), mails, f"{m.cpu_s:.2f}", f"{m.rss_mb:.0f}", f"{m.stops_completed} ({i.get('max_parallel_stops')})",
            r_all, r_stop]) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- main


def bench(args: argparse.Namespace) -> list[Measure]:
    rows: list[Measure] = []
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="reaper-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for key in args.scenarios:
        sc = SCENARIOS[key]
        sizes = tuple(args.n) if args.n else sc.sizes
        for n in sizes:
            for tool in args.tools:
                ran_n = n
                if tool == "culler":
                    scale = args.scale_culler if args.scale_culler is not None else sc.culler_scale
                    if scale and scale < n and not args.no_scale:
                        ran_n = scale
                sim = Sim(sc.sim_args(ran_n) + list(args.sim_arg or []), workdir)
                try:
                    print(f"# scenario {key} N={ran_n} {tool}: sim at {sim.url}", file=sys.stderr, flush=True)
                    if sc.cold:
                        m = (run_cold_culler(sim, sc, n, ran_n, workdir, args.timeout) if tool == "culler"
                             else run_cold_ours(sim, sc, n, workdir, args.timeout))
                    elif tool == "culler":
                        m = run_culler(sim, sc, n, ran_n, workdir, args.timeout).scaled()
                    else:
                        m = run_ours_measured(sim, sc, n, workdir, args.timeout)
                finally:
                    sim.stop()
                rows.append(m)
                print((cold_table if sc.cold else table)([m]).splitlines()[-1], file=sys.stderr, flush=True)
    return rows


def culler_once(argv: Sequence[str]) -> int:
    """Child: one run of jupyterhub-idle-culler's cull_idle, configured by its own Application."""
    import asyncio

    from jupyterhub_idle_culler import IdleCuller, cull_idle

    app = IdleCuller()
    app.initialize(list(argv))
    try:  # as IdleCuller.start() does (cull_idle then configures the simple client anyway)
        from tornado.httpclient import AsyncHTTPClient

        AsyncHTTPClient.configure("tornado.curl_httpclient.CurlAsyncHTTPClient")
    except ImportError as e:
        app.log.warning(f"Could not load pycurl: {e}")
    import resource

    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    asyncio.run(
        cull_idle(
            url=app.url,
            api_token=os.environ["JUPYTERHUB_API_TOKEN"],
            inactive_limit=app.timeout,
            logger=app.log,
            cull_users=app.cull_users,
            remove_named_servers=app.remove_named_servers,
            max_age=app.max_age,
            concurrency=app.concurrency,
            ssl_enabled=app.ssl_enabled,
            internal_certs_location=app.internal_certs_location,
            cull_admin_users=app.cull_admin_users,
            api_page_size=app.api_page_size,
            cull_default_servers=app.cull_default_servers,
            cull_named_servers=app.cull_named_servers,
            cull_arbiter=app.cull_arbiter_hook,
        )
    )
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    print(json.dumps({"sweep_s": round(wall, 3), "sweep_cpu_s": round(cpu, 3)}), flush=True)
    return 0


def ours_once(argv: Sequence[str]) -> int:
    import asyncio

    p = argparse.ArgumentParser(prog="benchmarks.run ours-once")
    p.add_argument("--api-url", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--idle-limit", type=int, default=3600)
    p.add_argument("--workdir", default=None)
    p.add_argument("--warmup", type=int, default=2400)
    p.add_argument("--stop-concurrency", type=int, default=64)
    a = p.parse_args(list(argv))
    summary = asyncio.run(
        run_ours(
            a.api_url,
            os.environ["JUPYTERHUB_API_TOKEN"],
            a.n,
            idle_limit_s=a.idle_limit,
            warmup_s=a.warmup,
            stop_concurrency=a.stop_concurrency,
            workdir=a.workdir,
        )
    )
    print(json.dumps(summary, default=str), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    global OURS_STOP_CONCURRENCY
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["culler-once"]:
        return culler_once(argv[1:])
    if argv[:1] == ["ours-once"]:
        return ours_once(argv[1:])
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scenarios", default="1,2,3,4", type=lambda s: [x.strip() for x in s.split(",") if x.strip()]
    )
    p.add_argument(
        "--tools", default="culler,ours", type=lambda s: [x.strip() for x in s.split(",") if x.strip()]
    )
    p.add_argument("--n", type=int, action="append", help="override the scenario's sizes (repeatable)")
    p.add_argument(
        "--scale-culler",
        type=int,
        default=None,
        help="run the culler at this N and extrapolate linearly (labeled in the table)",
    )
    p.add_argument("--no-scale", action="store_true", help="never extrapolate: run the culler at full N")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per tool run before it is killed")
    p.add_argument("--workdir", default=None, help="logs and the sweep's database go here")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.add_argument("--sim-arg", action="append", help="extra hubsim argument, e.g. --sim-arg=--shared-target")
    p.add_argument("--ours-stop-concurrency", type=int, default=OURS_STOP_CONCURRENCY)
    args = p.parse_args(argv)
    OURS_STOP_CONCURRENCY = args.ours_stop_concurrency
    for k in args.scenarios:
        if k not in SCENARIOS:
            p.error(f"unknown scenario {k!r} (known: {', '.join(SCENARIOS)})")
    for t in args.tools:
        if t not in ("culler", "ours"):
            p.error(f"unknown tool {t!r}")
    rows = bench(args)
    warm = [m for m in rows if m.scenario != "5"]
    if warm:
        print(table(warm))
    if len(warm) < len(rows):
        print(cold_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([m.__dict__ for m in rows], indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
