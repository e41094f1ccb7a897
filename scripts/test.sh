#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine (as root) and runs the whole test suite:
# unit tests, adapter tests, and integration tests against a real JupyterHub, real Slurm, a real
# SMTP server, PostgreSQL and Chromium, all started by the test harness on 127.0.0.1.
#   scripts/test.sh [pytest args...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REAPER_VENV:-/opt/jupyterhub-reaper/venv}"
bash "$here/scripts/setup.sh" --test
cd "$here"
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure here, not a pass" >&2
  exit 1
fi
exit $rc
