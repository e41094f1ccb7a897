"""Fake PBS Pro / Torque `qstat` and `qdel` for tests/adapters/test_pbs.py.

The executables `qstat` and `qdel` next to this file run it. They print the documented output
formats and error messages of the real commands for the jobs in a JSON state file:

  FAKE_PBS_STATE   path of {"server": "pbs01", "jobs": [{"id": "101.pbs01", "name", "owner",
                   "state": "R", "queue", "exec_host", "ncpus", "ngpus", "mem", "walltime",
                   "stime": <epoch>}]}
  FAKE_PBS_FLAVOR  "pbspro" (qstat -f -F json) or "torque" (qstat -x XML); both also print the
                   classic `qstat -f` text (without -F/-x), as the real ones do: 4-space
                   attributes, long values wrapped onto tab-indented lines. Torque refuses -F
                   ("qstat: invalid option -- 'F'", exit 2), as the real one does.
  jobs' "cput"     resources_used.cput of a running job (default 00:00:00)
  FAKE_PBS_FAIL    "RC:message": print message to stderr and exit RC (a broken server)
  FAKE_PBS_HANG    seconds to sleep before answering (writes its pid to FAKE_PBS_LOG.pid)
  FAKE_PBS_LOG     each call appends one JSON line {"argv", "user"}
qdel refuses (Unauthorized Request, exit 159) when the caller is neither root nor the owner.

PBS Pro: qstat -f -F json [ID] prints {"timestamp", "pbs_version", "pbs_server", "Jobs": {...}}
(no "Jobs" when none); unknown ID: "qstat: Unknown Job Id ID" (153); finished job without -x:
"qstat: ID Job has finished, use -x or -H to obtain historical job information" (35).
qdel: unknown "qdel: Unknown Job Id ID" (153), finished "qdel: Job has finished ID" (35).
Torque: qstat -x [ID] prints <Data><Job>...</Job></Data>; completed jobs stay listed as C;
unknown: "qstat: Unknown Job Id Error ID" (153); qdel of a completed job:
"qdel: Invalid request MSG=invalid state for job - COMPLETE ID" (170).
"""

from __future__ import annotations

import json
import os
import pwd
import sys
import time
from xml.sax.saxutils import escape


def _load() -> dict:
    with open(os.environ["FAKE_PBS_STATE"]) as f:
        return json.load(f)


def _save(state: dict) -> None:
    path = os.environ["FAKE_PBS_STATE"]
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)


def _find(state: dict, asked: str) -> dict | None:
    for job in state["jobs"]:
        if job["id"] == asked or job["id"].split(".")[0] == asked:
            return job
    return None


def _ctime(epoch: float) -> str:
    return time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(epoch))


def _pbspro_job(job: dict, server: str) -> dict:
    attrs: dict = {
        "Job_Name": job["name"],
        "Job_Owner": f"{job['owner']}@login01",
        "job_state": job["state"],
        "queue": job["queue"],
        "server": server,
        "Checkpoint": "u",
        "ctime": _ctime(job.get("stime", time.time()) - 5),
        "Resource_List": {
            "mem": job.get("mem", "1gb"),
            "ncpus": job.get("ncpus", 1),
            "ngpus": job.get("ngpus", 0),
            "nodect": 1,
            "select": f"1:ncpus={job.get('ncpus', 1)}:ngpus={job.get('ngpus', 0)}",
            "walltime": job.get("walltime", "01:00:00"),
        },
        "euser": job["owner"],
        "egroup": job["owner"],
    }
    if job["state"] in ("R", "E", "F") and job.get("exec_host"):
        attrs["exec_host"] = job["exec_host"]
        attrs["exec_vnode"] = f"({job['exec_host'].split('/')[0]}:ncpus={job.get('ncpus', 1)})"
        attrs["stime"] = _ctime(job["stime"])
        attrs["resources_used"] = {"cpupercent": 0, "cput": job.get("cput", "00:00:00"), "mem": "0kb",
                                   "walltime": "00:00:01"}
    return attrs


def _torque_job(job: dict, server: str) -> str:
    host = job.get("exec_host", "")
    nodes = f"1:ppn={job.get('ncpus', 1)}" + (f":gpus={job['ngpus']}" if job.get("ngpus") else "")
    parts = [
        f"<Job_Id>{escape(job['id'])}</Job_Id>",
        f"<Job_Name>{escape(job['name'])}</Job_Name>",
        f"<Job_Owner>{escape(job['owner'])}@login01</Job_Owner>",
        f"<job_state>{job['state']}</job_state>",
        f"<queue>{escape(job['queue'])}</queue>",
        f"<server>{escape(server)}</server>",
        f"<Resource_List><mem>{job.get('mem', '1gb')}</mem><nodes>{nodes}</nodes>"
        f"<walltime>{job.get('walltime', '01:00:00')}</walltime></Resource_List>",
        f"<euser>{escape(job['owner'])}</euser>",
    ]
    if job["state"] in ("R", "E", "C") and host:
        parts.append(f"<exec_host>{escape(host)}</exec_host>")
        parts.append(f"<start_time>{int(job['stime'])}</start_time>")
        parts.append(f"<resources_used><cput>{job.get('cput', '00:00:00')}</cput><mem>0kb</mem>"
                     "<walltime>00:00:01</walltime></resources_used>")
    return "<Job>" + "".join(parts) + "</Job>"


def _wrap(line: str, width: int = 79) -> str:
    """qstat -f wraps a long line at `width` characters onto tab-indented lines."""
    out = [line[:width]]
    rest = line[width:]
    while rest:
        out.append("\t" + rest[: width - 8])
        rest = rest[width - 8:]
    return "\n".join(out)


def _text_job(job: dict, server: str, flavor: str) -> str:
    running = job["state"] in ("R", "E", "C", "F") and job.get("exec_host")
    attrs = [("Job_Name", job["name"]), ("Job_Owner", f"{job['owner']}@login01")]
    if running:
        attrs += [("resources_used.cput", job.get("cput", "00:00:00")), ("resources_used.mem", "0kb"),
                  ("resources_used.walltime", "00:00:01")]
    attrs += [("job_state", job["state"]), ("queue", job["queue"]), ("server", server),
              ("ctime", _ctime(job.get("stime", time.time()) - 5))]
    if running:
        attrs.append(("exec_host", job["exec_host"]))
    attrs.append(("Resource_List.mem", job.get("mem", "1gb")))
    if flavor == "torque":
        nodes = f"1:ppn={job.get('ncpus', 1)}" + (f":gpus={job['ngpus']}" if job.get("ngpus") else "")
        attrs += [("Resource_List.ncpus", 1), ("Resource_List.nodes", nodes)]  # Torque's ncpus is 1
    else:
        attrs += [("Resource_List.ncpus", job.get("ncpus", 1)), ("Resource_List.ngpus", job.get("ngpus", 0))]
    attrs.append(("Resource_List.walltime", job.get("walltime", "01:00:00")))
    if running:
        attrs.append(("start_time" if flavor == "torque" else "stime", _ctime(job["stime"])))
    home = f"/home/{job['owner']}"
    attrs.append(("Variable_List", f"PBS_O_HOME={home},PBS_O_LOGNAME={job['owner']},PBS_O_PATH="
                  f"{home}/miniconda/envs/notebook/bin:{home}/miniconda/bin:/usr/local/bin:/usr/bin:/bin,"
                  f"PBS_O_SHELL=/bin/bash,PBS_O_WORKDIR={home},PBS_O_QUEUE={job['queue']}"))
    attrs.append(("euser", job["owner"]))
    lines = [f"Job Id: {job['id']}"] + [_wrap(f"    {k} = {v}") for k, v in attrs]
    return "\n".join(lines) + "\n"


def qstat(argv: list[str], state: dict, flavor: str) -> int:
    ids = [a for a in argv if not a.startswith("-") and a not in ("json",)]
    server = state.get("server", "pbs01")
    if flavor == "torque" and "-F" in argv:
        print("qstat: invalid option -- 'F'", file=sys.stderr)
        print("usage: qstat [-f [-1]] [-W site_specific] [-x] [ job_identifier... | destination... ]",
              file=sys.stderr)
        return 2
    if "-F" not in argv and "-x" not in argv:
        return _text(ids, state, server, flavor)
    if flavor == "pbspro":
        if "-F" not in argv or "json" not in argv:
            print("fake qstat: this fake only answers -f -F json or -f", file=sys.stderr)
            return 2
        jobs = []
        for asked in ids:
            job = _find(state, asked)
            if job is None:
                print(f"qstat: Unknown Job Id {asked}", file=sys.stderr)
                return 153
            if job["state"] == "F" and "-x" not in argv:
                print(
                    f"qstat: {job['id']} Job has finished, use -x or -H to obtain historical job information",
                    file=sys.stderr,
                )
                return 35
            jobs.append(job)
        if not ids:
            jobs = [j for j in state["jobs"] if j["state"] != "F" or "-x" in argv]
        out: dict = {"timestamp": int(time.time()), "pbs_version": "2022.1.5.20240101", "pbs_server": server}
        if jobs:
            out["Jobs"] = {j["id"]: _pbspro_job(j, server) for j in jobs}
        print(json.dumps(out, indent=4))
        return 0
    # torque -x
    jobs = []
    for asked in ids:
        job = _find(state, asked)
        if job is None:
            print(f"qstat: Unknown Job Id Error {asked}", file=sys.stderr)
            return 153
        jobs.append(job)
    if not ids:
        jobs = list(state["jobs"])
    if jobs:
        print('<?xml version="1.0"?><Data>' + "".join(_torque_job(j, server) for j in jobs) + "</Data>")
    return 0


def _text(ids: list[str], state: dict, server: str, flavor: str) -> int:
    jobs = []
    for asked in ids:
        job = _find(state, asked)
        if job is None:
            print(f"qstat: Unknown Job Id {'Error ' if flavor == 'torque' else ''}{asked}", file=sys.stderr)
            return 153
        if flavor == "pbspro" and job["state"] == "F":
            print(f"qstat: {job['id']} Job has finished, use -x or -H to obtain historical job information",
                  file=sys.stderr)
            return 35
        jobs.append(job)
    if not ids:
        jobs = [j for j in state["jobs"] if flavor == "torque" or j["state"] != "F"]
    print("\n".join(_text_job(j, server, flavor) for j in jobs), end="\n" if jobs else "")
    return 0


def qdel(argv: list[str], state: dict, flavor: str, caller: str) -> int:
    ids = [a for a in argv if not a.startswith("-")]
    for asked in ids:
        job = _find(state, asked)
        if job is None:
            print(f"qdel: Unknown Job Id {'Error ' if flavor == 'torque' else ''}{asked}", file=sys.stderr)
            return 153
        if job["state"] in ("F", "C"):
            if flavor == "torque":
                print(
                    f"qdel: Invalid request MSG=invalid state for job - COMPLETE {job['id']}", file=sys.stderr
                )
                return 170
            print(f"qdel: Job has finished {job['id']}", file=sys.stderr)
            return 35
        if caller not in ("root", job["owner"]):
            print(f"qdel: Unauthorized Request  {job['id']}", file=sys.stderr)
            return 159
        job["state"] = "C" if flavor == "torque" else "F"
    _save(state)
    return 0


def main(cmd: str) -> int:
    argv = sys.argv[1:]
    caller = pwd.getpwuid(os.geteuid()).pw_name
    log = os.environ.get("FAKE_PBS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"cmd": cmd, "argv": argv, "user": caller}) + "\n")
    hang = os.environ.get("FAKE_PBS_HANG")
    if hang:
        if log:
            with open(log + ".pid", "w") as f:
                f.write(str(os.getpid()))
        time.sleep(float(hang))
    fail = os.environ.get("FAKE_PBS_FAIL")
    if fail:
        rc, _, message = fail.partition(":")
        print(message, file=sys.stderr)
        return int(rc)
    flavor = os.environ.get("FAKE_PBS_FLAVOR", "pbspro")
    state = _load()
    return qstat(argv, state, flavor) if cmd == "qstat" else qdel(argv, state, flavor, caller)
