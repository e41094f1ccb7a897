"""A pytest plugin for tests/unit/test_skip_rule.py: every real part (JupyterHub, Slurm, PostgreSQL,
Chromium, root) reports itself missing, and the process is not root, so that CI alone decides
whether each skip site of the suite skips or fails. Load it with ``-p tests.harness.force_missing``."""

from __future__ import annotations

import os
import sys
from typing import Any

os.geteuid = lambda: 65534  # not root (the suite runs as root in CI): only CI may turn a skip into a failure


def _missing(*_version: Any) -> list[str]:  # missing_parts(version="6") of tests/harness/hub.py too
    return ["forced missing"]


def _pg_missing() -> tuple[bool, str]:
    return False, "forced missing"


def pytest_collection_finish(session: Any) -> None:
    # each test module imported its checks by name: replace them where they are used
    for mod in list(sys.modules.values()):
        if "/tests/" not in (getattr(mod, "__file__", "") or ""):
            continue
        for name, fake in (("missing_parts", _missing), ("hub_missing", _missing),
                           ("postgres_available", _pg_missing), ("CHROMIUM", "/nonexistent/chromium")):
            if hasattr(mod, name):
                setattr(mod, name, fake)
