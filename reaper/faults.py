"""Deterministic crash points for the fault suite (tests/faults).

``REAPER_CRASH_AT=after-record`` (or ``after-notify``, ``after-stop``) makes the process SIGKILL
itself the first time it reaches that point, as a power cut would. ``REAPER_CRASH_ONCE_FILE``
names a file created at the crash, so that the restarted process runs through. Unset in
production: then ``crashpoint`` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def crashpoint(name: str) -> None:
    if os.environ.get("REAPER_CRASH_AT") != name:
        return
    marker = os.environ.get("REAPER_CRASH_ONCE_FILE")
    if marker:
        p = Path(marker)
        if p.exists():
            return
        p.write_text(name)
    os.kill(os.getpid(), signal.SIGKILL)
