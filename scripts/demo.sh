#!/usr/bin/env bash
# Installs what the demo needs on a fresh Debian machine (as root) and starts a local JupyterHub on
# http://127.0.0.1:8000 with the reaper as its managed service (SQLite, short thresholds, notices
# to a local mail sink whose messages are printed in the log).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REAPER_VENV:-/opt/jupyterhub-reaper/venv}"
bash "$here/scripts/setup.sh"
cd "$here"
exec "$VENV/bin/jupyterhub-reaper" demo "$@"
