#!/usr/bin/env python3
"""`scontrol --json show node|res` for Slurm 22.05, which has no `--json` (added in 23.02).

slurmformspawner 2.11 builds its form from `scontrol --json show node` (cpus, real_memory, gres,
partitions, features) and `scontrol show res --json`; Debian 12 ships Slurm 22.05. The test
harness puts this script first on the hub's PATH as `scontrol`: it asks the REAL scontrol for the
same facts (`show node -o`, `show res -o`) and prints them in 23.02's JSON shape. Every other
`scontrol` call goes to the real one unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REAL = os.environ.get("REAPER_REAL_SCONTROL", "/usr/bin/scontrol")


def _records(kind: str) -> list[dict[str, str]]:
    out = subprocess.run([REAL, "show", kind, "-o"], check=True, capture_output=True, text=True).stdout
    records = []
    for line in out.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if fields:
            records.append(fields)
    return records


def _list(value: str | None) -> list[str]:
    return [] if value in (None, "", "(null)") else value.split(",")


def nodes() -> dict[str, object]:
    return {"nodes": [
        {
            "name": n.get("NodeName", ""),
            "cpus": int(n.get("CPUTot", "0")),
            "real_memory": int(n.get("RealMemory", "0")),
            "specialized_memory": int(n.get("MemSpecLimit", "0") or 0),
            "gres": "" if n.get("Gres") in (None, "(null)") else n["Gres"],
            "partitions": _list(n.get("Partitions")),
            "active_features": _list(n.get("ActiveFeatures")),
        }
        for n in _records("node")
    ]}


def reservations() -> dict[str, object]:
    return {"reservations": []} if not any("ReservationName" in r for r in _records("res")) else {
        "reservations": "unsupported by this shim"}


def main(argv: list[str]) -> int:
    if "--json" in argv:
        rest = [a for a in argv if a != "--json"]
        if rest[:1] == ["show"] and rest[1:2] and rest[1].startswith("node"):
            print(json.dumps(nodes()))
            return 0
        if rest[:1] == ["show"] and rest[1:2] and rest[1].startswith("res"):
            print(json.dumps(reservations()))
            return 0
    os.execv(REAL, [REAL, *argv])
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
