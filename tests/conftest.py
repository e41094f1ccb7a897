"""Generic test helpers shared by every test folder.

The one rule for tests needing real parts (JupyterHub, Slurm, PostgreSQL, Chromium) is
`tests.harness.require_real_part`: skip only if not root and not CI, otherwise fail when the part
is missing. The guard below makes any other skip fail the run in CI and as root.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Make `import tests.harness` work however pytest was started (python -m pytest or pytest).
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests import harness  # noqa: E402

_skipped: list[str] = []  # node ids of the tests and modules that skipped in this run


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:  # a whole module skipped at collection (allow_module_level=True)
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI, or as root, a skipped test fails the run, whatever skipped it (a library's
    importorskip, a module skipped at collection): a skip there would hide a real part that is
    missing. Counted from the reports themselves, so it holds whatever reporter plugins run."""
    if harness.may_skip_real_parts() or not _skipped:
        return
    if session.exitstatus in (0, pytest.ExitCode.NO_TESTS_COLLECTED):
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"{len(_skipped)} test(s) skipped, and skips are failures in CI and as root: "
                                + ", ".join(_skipped[:5]), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
