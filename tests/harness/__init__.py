"""Test harness: real parts (a real JupyterHub, ...) started and stopped by the test suite.

Also the one rule every test needing a real part follows: it may skip only when the machine is
neither running as root nor CI; as root or in CI (env CI=true) a missing part is a failure.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["in_ci", "is_root", "may_skip_real_parts", "require_real_part"]


def in_ci() -> bool:
    """True when running in CI (env CI set to true/1/yes, as GitHub Actions, GitLab and others do)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def is_root() -> bool:
    return os.geteuid() == 0


def may_skip_real_parts() -> bool:
    """A test needing a real part may skip only when not root AND not CI."""
    return not is_root() and not in_ci()


def require_real_part(available: bool, what: str) -> None:
    """Skip (only where allowed) or fail when a real part the test needs is missing."""
    if available:
        return
    if may_skip_real_parts():
        pytest.skip(f"{what} is not available (not root and not CI)")
    pytest.fail(f"{what} is not available, and as root or in CI that is a failure", pytrace=False)
