"""A corpus of broken config.yaml files: each is rejected by `check-config` and at start.

Every file in tests/badinput/corpus/ starts with a header saying what is wrong and what the
message must contain:

    # expect-line: 12                       the line the message names (file:LINE)
    # expect-key: rules[0].detached.stop_after   the key path (empty for YAML syntax errors)
    # expect-message: must be later than    a fragment of the message (may repeat)
    # expect-absent: SMTP-PASS-5678         a value that must never be printed (secrets)

Both commands run as real subprocesses (the installed console script), with a hub token and an
unreachable hub URL, so that only the configuration can make `run` fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parent / "corpus"
REPO = CORPUS.parents[2]
SCRIPT = Path(sys.executable).parent / "jupyterhub-reaper"


@dataclass
class Case:
    path: Path
    line: int
    key: str
    messages: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    what: str = ""

    def expected_prefix(self, shown_path: str) -> str:
        return f"{shown_path}:{self.line}: {self.key}: " if self.key else f"{shown_path}:{self.line}: "


def load_case(path: Path) -> Case:
    line: int | None = None
    key: str | None = None
    case = Case(path, 0, "")
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not raw.startswith("#"):
            break
        text = raw.lstrip("#").strip()
        tag, _, value = text.partition(":")
        value = value.strip()
        if tag == "expect-line":
            line = int(value)
        elif tag == "expect-key":
            key = value
        elif tag == "expect-message":
            case.messages.append(value)
        elif tag == "expect-absent":
            case.absent.append(value)
        elif tag == "What is wrong":
            case.what = value
    assert line is not None and key is not None and case.messages and case.what, (
        f"{path.name}: the header needs 'What is wrong:', expect-line, expect-key and expect-message"
    )
    case.line, case.key = line, key
    return case


FILES = sorted(CORPUS.glob("*.yaml"))
CASES = [load_case(p) for p in FILES]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REAPER_", "JUPYTERHUB_"))}
    env.update(
        {
            "JUPYTERHUB_API_TOKEN": "x",
            # port 9 (discard) on loopback: nothing listens, so nothing can be reached
            "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api",
            "PYTHONPATH": str(REPO),
        }
    )
    return env


@pytest.fixture
def corpus_copy(tmp_path: Path) -> Path:
    """The corpus copied to a fresh folder, so that a config that wrongly starts a service (and
    creates reaper.sqlite next to itself) shows up as a new file and never touches the repo."""
    dest = tmp_path / "corpus"
    shutil.copytree(CORPUS, dest)
    return dest


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _check(case: Case, out: str, shown: str) -> None:
    prefix = case.expected_prefix(shown)
    lines = [ln for ln in out.splitlines() if ln.startswith(prefix)]
    assert lines, f"no line starting with {prefix!r} in:\n{out}"
    joined = "\n".join(lines)
    for fragment in case.messages:
        assert fragment in joined, f"{fragment!r} not in the message for {case.path.name}:\n{out}"
    for secret in case.absent:
        assert secret not in out, f"{secret!r} printed:\n{out}"


def test_corpus_has_at_least_twenty_files_each_with_a_header() -> None:
    assert len(CASES) >= 20
    assert len({c.path.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.path.stem for c in CASES])
def test_check_config_rejects_with_file_key_path_and_line(case: Case, corpus_copy: Path) -> None:
    path = corpus_copy / case.path.name
    before = _files(corpus_copy)
    r = subprocess.run(
        [str(SCRIPT), "check-config", str(path)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=corpus_copy,
        timeout=60,
    )
    assert r.returncode != 0, f"check-config accepted {case.path.name} ({case.what}):\n{r.stdout}"
    assert "valid" not in r.stdout
    _check(case, r.stderr, str(path))
    for secret in case.absent:
        assert secret not in r.stdout
    assert _files(corpus_copy) == before


@pytest.mark.parametrize("case", CASES, ids=[c.path.stem for c in CASES])
def test_run_refuses_to_start_with_the_same_message(case: Case, corpus_copy: Path) -> None:
    path = corpus_copy / case.path.name
    before = _files(corpus_copy)
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            [str(SCRIPT), "run", "--config", str(path)],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=corpus_copy,
            timeout=30,
        )
    except subprocess.TimeoutExpired as e:  # it started and kept running: the config was accepted
        pytest.fail(f"run kept running with {case.path.name} ({case.what}):\n{e.stderr!r}")
    elapsed = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0, f"run exited 0 with {case.path.name}:\n{out}"
    assert elapsed < 15, f"run took {elapsed:.1f}s to refuse {case.path.name}"
    assert "reaper started" not in out
    _check(case, out, str(path))
    # nothing was started: no database next to the config, no other file
    assert _files(corpus_copy) == before


def test_a_corrected_corpus_file_is_accepted(corpus_copy: Path) -> None:
    """The harness can tell a good file from a bad one: fixing the one mistake makes it valid."""
    path = corpus_copy / "12_stop_before_warn_defaults.yaml"
    path.write_text(path.read_text().replace("stop_after: 1h", "stop_after: 3h"))
    r = subprocess.run(
        [str(SCRIPT), "check-config", str(path)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=corpus_copy,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "stop_after: 3h" in r.stdout
