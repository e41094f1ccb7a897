"""The scan's pure parts, on process tables a test writes: psutil's info missing, None (AccessDenied) or of the
wrong type, processes that vanish while read (the race with the live table), identity by environment and
cgroup, attribution to terminals and kernels, ancestors and zombies left out."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import psutil

from reaper.singleuser import processes as ps
from reaper.singleuser.activity import build_report, kernel_pids, terminal_ptys

UID = 1000
IDENT = ps.Identity(((("JUPYTERHUB_REAPER_SERVER", "me"),),))


def times(user: float, system: float) -> Any:
    return SimpleNamespace(user=user, system=system)


def proc(pid: int, ppid: int, name: str | None = "python", *, uid: int | None = UID, cpu: Any = None,
         status: str = "running", started: Any = 1.7e9) -> Any:
    return SimpleNamespace(info={"pid": pid, "ppid": ppid, "name": name,
                                 "uids": SimpleNamespace(real=uid) if uid is not None else None,
                                 "create_time": started, "cpu_times": cpu or times(1.0, 0.5), "status": status})


class Vanished:
    @property
    def info(self) -> Any:
        raise psutil.NoSuchProcess(4242)


def test_rows_tolerate_missing_none_and_wrong_typed_fields_and_vanished_processes() -> None:
    table = ps.read_table([
        proc(10, 1),
        SimpleNamespace(info={"pid": 11, "ppid": None, "name": None, "uids": None, "create_time": None,
                              "cpu_times": None, "status": None}),  # what AccessDenied leaves (ad_value None)
        SimpleNamespace(info={"pid": 12, "ppid": "1", "name": 7, "uids": (0, 0, 0), "create_time": "soon",
                              "cpu_times": times(None, 1.0), "status": psutil.STATUS_ZOMBIE}),
        SimpleNamespace(info={"pid": None}), SimpleNamespace(info={}), SimpleNamespace(info=None),
        SimpleNamespace(), Vanished(),
    ])
    assert set(table) == {10, 11, 12}
    assert table[10].cpu == 1.5 and table[10].uid == UID
    assert table[11] == ps.Row(11, None, None, None, None, None, False)
    assert table[12].ppid is None and table[12].name is None and table[12].cpu is None and table[12].zombie


def test_a_name_never_carries_arguments_even_when_a_program_rewrote_its_argv0() -> None:
    assert ps.command_name("python3") == "python3"
    assert ps.command_name("train.py --token=SECRET") == "train.py"
    assert ps.command_name("  ") is None and ps.command_name(None) is None and ps.command_name(3) is None
    assert len(ps.command_name("x" * 500) or "") == 64


def test_a_report_from_a_table_with_holes_and_a_dead_process_is_still_whole() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    table = ps.read_table([
        proc(100, 1, "jupyter-server"),
        SimpleNamespace(info={"pid": 101, "ppid": 100, "name": None, "uids": None, "create_time": None,
                              "cpu_times": None, "status": None}),  # a kernel psutil could not read
        proc(102, 101, "python"),
        proc(dead.pid, 1, "python"),  # listed, then gone before its environment is read
    ])
    kernels = [{"id": "k1", "name": "python3", "pid": 101, "execution_state": "idle"},
               {"id": "k2", "name": "remote", "pid": None, "execution_state": "busy"}]
    report = build_report(100, kernels, [("1", 999, None)], IDENT, now=datetime(2026, 1, 1, tzinfo=UTC),
                          table=table, uid=UID)
    assert report["now"] == "2026-01-01T00:00:00Z"
    assert report["kernels"][0] == {"id": "k1", "name": "python3", "pid": 101, "execution_state": "idle",
                                    "cpu_seconds": 0.0, "started": None}
    assert report["kernels"][1]["pid"] is None and report["kernels"][1]["started"] is None
    assert report["terminals"] == [{"name": "1", "pid": 999, "foreground": None}]  # its shell is not in the table
    assert [(p["pid"], p["started_by"], p["source"]) for p in report["processes"]] == [(102, "kernel", "k1")]
    assert report["processes"][0]["started"] == ps.iso(1.7e9)


def test_same_user_processes_are_members_by_environment_or_job_cgroup_only() -> None:
    table = ps.read_table([
        proc(1, 0, "systemd", uid=0), proc(50, 1, "bash"), proc(51, 50, "batchspawner-si"),
        proc(100, 51, "jupyterhub-sing"),           # the server, under its batch script and wrapper
        proc(200, 1, "sleep"),                      # nohup'd, reparented: carries the marker
        proc(201, 1, "python"),                     # another server's program: another marker
        proc(202, 1, "python", uid=0),              # another user's process: never read
        proc(203, 1, "train"),                      # cleared its environment, but in the job's cgroup
        proc(204, 1, "slurmstepd"), proc(205, 1, "python", status=psutil.STATUS_ZOMBIE),
        proc(206, 1, "python"),                     # job 77 of another cluster on the same machine
        proc(207, 1, "python"),                     # this job's, found by its Slurm variables
    ])
    envs = {200: {"JUPYTERHUB_REAPER_SERVER": "me"}, 201: {"JUPYTERHUB_REAPER_SERVER": "other"},
            202: {"JUPYTERHUB_REAPER_SERVER": "me"}, 204: {"SLURM_JOB_ID": "77"},
            205: {"JUPYTERHUB_REAPER_SERVER": "me"}, 50: {"SLURM_JOB_ID": "77"},
            206: {"SLURM_JOB_ID": "77", "SLURM_CLUSTER_NAME": "c", "SLURM_CONF": "/other/slurm.conf"},
            207: {"SLURM_JOB_ID": "77", "SLURM_CLUSTER_NAME": "c", "SLURM_CONF": "/etc/slurm.conf", "X": "y"}}
    cgroups = {203: "0::/system.slice/slurmstepd.scope/job_77/step_batch/user/task_0\n"}
    ident = ps.identity_from({"JUPYTERHUB_REAPER_SERVER": "me", "SLURM_JOB_ID": "77", "SLURM_CLUSTER_NAME": "c",
                              "SLURM_CONF": "/etc/slurm.conf"})
    got = ps.job_processes(100, table, {}, {}, ident, uid=UID, environ=envs.get, cgroup=cgroups.get)
    assert [(p["pid"], p["name"], p["started_by"]) for p in got] == [
        (200, "sleep", "other"), (203, "train", "other"), (207, "python", "other")]
    # without the Slurm job, the cgroup is not asked
    got = ps.job_processes(100, table, {}, {}, IDENT, uid=UID, environ=envs.get, cgroup=cgroups.get)
    assert [p["pid"] for p in got] == [200]


def test_the_hub_identity_needs_both_prefix_and_hub_url() -> None:
    ident = ps.identity_from({"JUPYTERHUB_SERVICE_PREFIX": "/user/a/", "JUPYTERHUB_API_URL": "http://h/hub/api"})
    table = ps.read_table([proc(100, 1), proc(300, 1), proc(301, 1)])
    envs = {300: {"JUPYTERHUB_SERVICE_PREFIX": "/user/a/", "JUPYTERHUB_API_URL": "http://h/hub/api"},
            301: {"JUPYTERHUB_SERVICE_PREFIX": "/user/a/", "JUPYTERHUB_API_URL": "http://other/hub/api"}}
    assert [p["pid"] for p in ps.job_processes(100, table, {}, {}, ident, uid=UID, environ=envs.get)] == [300]
    assert ps.identity_from({}).groups == ()


def test_the_nearest_kernel_or_terminal_started_a_process() -> None:
    table = ps.read_table([
        proc(100, 1), proc(110, 100, "python"), proc(111, 110, "bash"), proc(112, 111, "python"),
        proc(120, 100, "bash"), proc(121, 120, "python"), proc(122, 121, "sh"), proc(130, 100, "git"),
    ])
    got = ps.job_processes(100, table, {110: "K"}, {120: "1"}, IDENT, uid=UID, environ=lambda pid: None)
    assert {p["pid"]: (p["started_by"], p["source"]) for p in got} == {
        111: ("kernel", "K"), 112: ("kernel", "K"), 121: ("terminal", "1"), 122: ("terminal", "1"),
        130: ("other", None),
    }


def test_foreground_without_a_pty_is_the_shells_newest_child() -> None:
    table = ps.read_table([proc(120, 100, "bash"), proc(121, 120, "sleep", started=1.0),
                           proc(122, 120, "python", started=2.0), proc(123, 120, "top", status=psutil.STATUS_ZOMBIE)])
    assert ps.foreground(120, None, table) == "python"
    assert ps.foreground(121, None, table) is None and ps.foreground(None, None, table) is None
    assert ps.foreground(120, 10**6, table) == "python"  # a closed fd: tcgetpgrp fails, the children decide


def test_managers_that_lack_attributes_give_empty_lists() -> None:
    assert kernel_pids(None) == [] and terminal_ptys(None) == [] and terminal_ptys(object()) == []

    class KM:
        def list_kernel_ids(self) -> list[str]:
            return ["gone", "here"]

        def get_kernel(self, kid: str) -> Any:
            if kid == "gone":
                raise KeyError(kid)
            return SimpleNamespace(kernel_name="python3", provisioner=None)

    assert kernel_pids(KM()) == [{"id": "here", "name": "python3", "pid": None, "execution_state": "unknown"}]
    tm = SimpleNamespace(terminals={"1": SimpleNamespace(ptyproc=SimpleNamespace(pid=5, fd=None)),
                                    "2": SimpleNamespace()})
    assert terminal_ptys(tm) == [("1", 5, None), ("2", None, None)]


def test_the_live_table_reads_this_process_and_environments_of_live_and_dead_ones() -> None:
    table = ps.read_table()
    me = table[os.getpid()]
    assert me.name and me.cpu is not None and me.uid == os.getuid() and me.started
    child = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                             env={**os.environ, "REAPER_TEST_VAR": "a=b\u00e9"}, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"  # exec'd: its own environment
        assert ps.read_environ(child.pid)["REAPER_TEST_VAR"] == "a=b\u00e9"
        assert ps.read_environ(child.pid) == psutil.Process(child.pid).environ()
    finally:
        child.kill()
        child.wait()
    assert ps.read_environ(child.pid) is None and ps.read_environ(2**22 + 1) is None
