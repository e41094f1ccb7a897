"""The one skip site (tests.harness.require_real_part) and the CI guard: in CI, or as root, a
missing real part fails the run; only a developer's machine without root may skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import harness

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("ci_value", ["true", "1", "yes", "TRUE"])
def test_in_ci_a_missing_part_fails_even_without_root(monkeypatch: pytest.MonkeyPatch, ci_value: str) -> None:
    monkeypatch.setenv("CI", ci_value)
    monkeypatch.setattr(harness.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.fail.Exception, match="Slurm is not available"):
        harness.require_real_part(False, "Slurm")


def test_as_root_a_missing_part_fails_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(harness.os, "geteuid", lambda: 0)
    with pytest.raises(pytest.fail.Exception):
        harness.require_real_part(False, "PostgreSQL")


def test_only_a_developer_without_root_outside_ci_may_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "false")
    monkeypatch.setattr(harness.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception):
        harness.require_real_part(False, "Chromium")
    harness.require_real_part(True, "Chromium")  # present: nothing happens


SKIPS = {
    "importorskip": "import pytest\n\ndef test_ok():\n    pass\n\n"
                    "def test_skipped():\n    pytest.importorskip('no_such_module_here')\n",
    "mark": "import pytest\n\ndef test_ok():\n    pass\n\n"
            "@pytest.mark.skip(reason='stray')\ndef test_skipped():\n    pass\n",
    "module": "import pytest\n\npytest.skip('whole module', allow_module_level=True)\n\n"
              "def test_never():\n    pass\n",
}


def _child_pytest(tmp_path: Path, body: str, *options: str, ci: bool = True) -> subprocess.CompletedProcess[str]:
    """A child pytest with this project's conftest, run WITHOUT root: as ``nobody`` when this
    process is root (as in CI), so that what fails its run is ``CI`` alone, not root."""
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="skip-rule-")) if as_root else tmp_path  # pytest's tmp is 0700
    tdir = base / "tests"
    tdir.mkdir()
    (tdir / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tdir / "test_x.py").write_text(body)
    if as_root:
        for path in (base, tdir):
            path.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(base)}
    if ci:
        env["CI"] = "true"
    try:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *(options or ("-q",)), str(tdir)],
            cwd=base, env=env, capture_output=True, text=True, timeout=120,
            user="nobody" if as_root else None, group="nogroup" if as_root else None,
        )
    finally:
        if as_root:
            shutil.rmtree(base, ignore_errors=True)


def test_the_child_runs_without_root_and_may_skip_outside_ci(tmp_path: Path) -> None:
    # the control: the same skip, not in CI and not root, passes (exit 0, one skipped), so the
    # failures below come from CI alone
    body = ("import os\nimport pytest\n\ndef test_not_root():\n    assert os.geteuid() != 0\n\n"
            "@pytest.mark.skip(reason='a developer without root')\ndef test_skipped():\n    pass\n")
    run = _child_pytest(tmp_path, body, ci=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed, 1 skipped" in run.stdout, run.stdout


@pytest.mark.parametrize("how", sorted(SKIPS))
def test_in_ci_any_skip_fails_the_run(tmp_path: Path, how: str) -> None:
    # A skip that does not go through require_real_part (a library's importorskip, a stray mark,
    # a module skipped at collection) must fail the run in CI too: the conftest guard turns it
    # into a failing exit status.
    run = _child_pytest(tmp_path, SKIPS[how])
    assert run.returncode == 1, run.stdout + run.stderr
    assert "skipped" in run.stdout  # the tests themselves ran (or were collected); the guard failed the run
    assert "skips are failures in CI" in run.stdout


def test_in_ci_a_skip_fails_the_run_without_the_terminal_reporter(tmp_path: Path) -> None:
    # the guard counts the reports themselves, not the terminal's tally
    run = _child_pytest(tmp_path, SKIPS["importorskip"], "-p", "no:terminal")
    assert run.returncode == 1, run.stdout + run.stderr


def test_in_ci_a_run_without_skips_passes(tmp_path: Path) -> None:
    run = _child_pytest(tmp_path, "def test_ok():\n    pass\n")
    assert run.returncode == 0, run.stdout + run.stderr


# Every place in the suite that needs a real part, run with each part reported missing:
SITES = [
    "tests/unit/test_store.py",  # PostgreSQL (session fixture pg_server)
    "tests/faults/test_database_faults.py",  # PostgreSQL, and the real hub
    "tests/integration/test_browser.py",  # the real hub, chromium, playwright
    "tests/integration/test_lab_notice.py",  # the real hub, chromium, playwright (the notice in JupyterLab)
    "tests/integration/test_slurm_batch.py",  # Slurm, and the real hub on Slurm
    "tests/integration/test_site_spawners.py",  # the sites' spawners: a hub of each version on Slurm
    "tests/integration/test_managed_service.py",  # the real hub (tests/integration/conftest.py)
    "tests/adapters/test_pbs.py",  # root, to run qdel as another user
    "tests/integration/test_google_login.py",  # the real hub with GoogleOAuthenticator
    "tests/integration/test_lab_e2e.py",  # the real hub, chromium, playwright (the whole #15 path)
]


def test_every_file_that_calls_the_skip_rule_is_a_site_here() -> None:
    """A new real-part site is checked by the two tests below only if it is listed in SITES."""
    callers = {
        str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("*.py")
        if "require_real_part(" in p.read_text(encoding="utf-8")
    } - {"tests/harness/__init__.py", "tests/unit/test_skip_rule.py",
         "tests/harness/lab.py"}  # (the Lab helpers' check, reached through test_lab_notice/test_lab_e2e)
    # a conftest's fixture is reached through a test file that uses it
    callers = {"tests/integration/test_managed_service.py" if c == "tests/integration/conftest.py" else c
               for c in callers}
    assert callers <= set(SITES), sorted(callers - set(SITES))


def _sites_run(ci: bool) -> tuple[subprocess.CompletedProcess[str], set[str], set[str]]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("CI", None)
    if ci:
        env["CI"] = "true"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.harness.force_missing", "-q",
         "-rfEs", "--timeout", "120", *SITES],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    failed = {line.split()[1] for line in run.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))}
    skipped = {line for line in run.stdout.splitlines() if line.startswith("SKIPPED ")}
    return run, failed, skipped


def test_every_real_part_site_fails_in_ci_when_its_part_is_missing() -> None:
    run, failed, skipped = _sites_run(ci=True)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-2000:]
    assert not skipped and " skipped" not in run.stdout.splitlines()[-1], run.stdout[-3000:]
    assert "is not available, and as root or in CI that is a failure" in run.stdout
    for site in SITES:  # each site failed for its missing part, none passed silently
        assert any(f.startswith(site) for f in failed), (site, sorted(failed))
    # the control, outside CI and without root: the same tests skip (and nothing else does)
    control, control_failed, _ = _sites_run(ci=False)
    assert control.returncode == 0, control.stdout[-3000:]
    last = control.stdout.splitlines()[-1]
    assert f"{len(failed)} skipped" in last and not control_failed, (last, len(failed))
