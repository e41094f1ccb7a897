"""Installing the distribution enables the companion: the wheel ships
etc/jupyter/jupyter_server_config.d/jupyterhub_reaper.json, which an installed jupyter_server reads, and
`jupyter server extension disable|enable reaper.singleuser` toggle it in that environment (the default
--sys-prefix; jupyter_server 2 refuses --user for an extension no user config lists yet)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests.unit.test_packaging import wheel  # noqa: F401  (the module's wheel, built from this checkout)

CONFIG_D = "etc/jupyter/jupyter_server_config.d/jupyterhub_reaper.json"
BIN = Path(sys.executable).parent


def test_the_wheel_ships_the_config_file_that_enables_the_companion(wheel: Path) -> None:  # noqa: F811
    names = zipfile.ZipFile(wheel).namelist()
    (entry,) = [n for n in names if n.endswith(".data/data/" + CONFIG_D)]
    assert json.loads(zipfile.ZipFile(wheel).read(entry)) == {
        "ServerApp": {"jpserver_extensions": {"reaper.singleuser": True}}
    }
    assert "reaper/singleuser/__init__.py" in names and "reaper/singleuser/activity.py" in names


def _listed(python: Path, env: dict[str, str]) -> str:
    done = subprocess.run([str(python), "-m", "jupyter_server", "extension", "list"], env=env, capture_output=True,
                          text=True, timeout=120)
    out = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
    return "\n".join(line.strip() for line in out.splitlines() if "reaper.singleuser" in line)


def test_an_installed_wheel_enables_it_and_jupyter_server_extension_enable_toggles_it(
    wheel: Path, tmp_path: Path  # noqa: F811
) -> None:
    # a fresh environment (jupyter_server and psutil borrowed from this venv by a .pth line) with the wheel
    # installed as a user would: its etc/jupyter is where the installed config file must land
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "shared.pth").write_text(sysconfig.get_path("purelib") + "\n")
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (env_dir / CONFIG_D).is_file()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "PYTHON"))},
           "JUPYTER_CONFIG_DIR": str(tmp_path / "user-config"), "HOME": str(tmp_path)}
    listed = _listed(python, env)
    assert re.search(r"reaper\.singleuser\s+enabled", listed) and re.search(r"reaper\.singleuser\s+OK", listed), listed
    for verb, state in (("disable", "disabled"), ("enable", "enabled")):
        done = subprocess.run([str(python), "-m", "jupyter_server", "extension", verb, "reaper.singleuser"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "Validation failed" not in done.stderr, done.stderr
        assert re.search(rf"reaper\.singleuser\s+{state}", _listed(python, env)), _listed(python, env)
