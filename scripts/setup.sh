#!/usr/bin/env bash
# Installs everything jupyterhub-reaper needs on a fresh Debian 12 machine (as root), idempotently.
#   scripts/setup.sh            the demo set: Python venv, JupyterHub, configurable-http-proxy
#   scripts/setup.sh --test     also what the test suite needs: Slurm + munge, PostgreSQL, Chromium,
#                               and a second venv with the newest JupyterHub 5.4.x ($REAPER_VENV54,
#                               default /opt/jupyterhub-reaper/venv-hub54): the core-path tests
#                               run against both hubs (tests/harness/hub.py HUB_VERSIONS)
# The venv is made from Debian's /usr/bin/python3 in a world-readable place, because
# single-user servers started as Slurm jobs run as the unix user and must import from it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REAPER_VENV:-/opt/jupyterhub-reaper/venv}"
VENV54="${REAPER_VENV54:-/opt/jupyterhub-reaper/venv-hub54}"
NODE_PREFIX="${REAPER_NODE_PREFIX:-/opt/jupyterhub-reaper/node}"
want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

log() { printf '[setup] %s\n' "$*" >&2; }

apt_pkgs=(python3-venv python3-dev)
# Node.js may come from elsewhere (e.g. nodesource, which bundles npm): only ask Debian when absent.
command -v npm >/dev/null 2>&1 || apt_pkgs+=(nodejs npm)
if (( want_test )); then
  # slurm-wlm-torque: PBS-style qstat/qdel over Slurm, for the PBS adapter's real-command tests
  apt_pkgs+=(slurm-wlm slurm-wlm-torque munge postgresql chromium)
fi
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating venv $VENV"
  mkdir -p "$(dirname "$VENV")"
  /usr/bin/python3 -m venv "$VENV"
fi
chmod 755 "$(dirname "$VENV")"
extras="demo"
(( want_test )) && extras="demo,test"
log "pip install -e .[$extras]"
"$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || log "pip self-upgrade skipped"
"$VENV/bin/pip" install -q -e "$here[$extras]" 2>&1 | { grep -vE "^WARNING: Location|BuildBackendWarning|^ *!!|^ *\*+$|^ *corresp|^\s*$" || true; }

# The JupyterLab extension, built by the install above (setup.py's build_py, with npm): an editable
# install leaves data files out, so link the built folder where JupyterLab looks for it.
labext="$VENV/share/jupyter/labextensions/jupyterhub-reaper"
if [[ -f "$here/labextension/prebuilt/package.json" ]] && { [[ -L "$labext" ]] || [[ ! -e "$labext" ]]; }; then
  mkdir -p "$(dirname "$labext")"
  ln -sfn "$here/labextension/prebuilt" "$labext"
fi

if [[ ! -x "$NODE_PREFIX/node_modules/.bin/configurable-http-proxy" ]]; then
  log "npm install configurable-http-proxy"
  mkdir -p "$NODE_PREFIX"
  npm install --silent --no-audit --no-fund --prefix "$NODE_PREFIX" configurable-http-proxy@5 >/dev/null 2>&1
fi
ln -sf "$NODE_PREFIX/node_modules/.bin/configurable-http-proxy" "$VENV/bin/configurable-http-proxy"

if (( want_test )); then
  # The second hub: the newest jupyterhub 5.4.x with the project and the sites' spawners, for the
  # tests that run on both hub versions. Everything a hub starts runs from its own venv.
  if [[ ! -x "$VENV54/bin/python" ]]; then
    log "creating venv $VENV54 (JupyterHub 5.4)"
    mkdir -p "$(dirname "$VENV54")"
    /usr/bin/python3 -m venv "$VENV54"
  fi
  log "pip install jupyterhub==5.4.* -e .[demo,singleuser,sites] into $VENV54"
  "$VENV54/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || log "pip self-upgrade skipped"
  "$VENV54/bin/pip" install -q "jupyterhub==5.4.*" -e "$here[demo,singleuser,sites]" 2>&1 \
    | { grep -vE "^WARNING: Location|BuildBackendWarning|^ *!!|^ *\*+$|^ *corresp|^\s*$" || true; }
  ln -sf "$NODE_PREFIX/node_modules/.bin/configurable-http-proxy" "$VENV54/bin/configurable-http-proxy"
  chmod -R a+rX "$(dirname "$VENV54")"
fi
chmod -R a+rX "$(dirname "$VENV")"
log "ready: $VENV"
