"""The wheel: it holds every file of the reaper package and the schema's migrations (alembic/ in
the repository, reaper/_migrations in the wheel), and an installed reaper upgrades a new database
from the migrations it ships. Builds the wheel with pip from this checkout (setuptools from pip's
configured sources when the interpreter's own is too old for pyproject.toml)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _setuptools_new_enough() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


def _checkout_copy(dest: Path) -> Path:
    """The checkout's files (tracked and new, not ignored) in a fresh folder: a build there sees no
    build/ or egg-info left by an earlier build, which would slip stale files into the wheel."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = _checkout_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(src)]
    if _setuptools_new_enough():
        cmd.insert(4, "--no-build-isolation")  # no download at all
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (whl,) = out.glob("jupyterhub_reaper-*.whl")
    return whl


def _tracked(folder: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", folder], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


def test_the_wheel_holds_every_file_of_the_package_and_the_migrations(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = _tracked("alembic")
    assert "alembic/env.py" in migrations and "alembic/script.py.mako" in migrations
    assert any(m.startswith("alembic/versions/") for m in migrations)
    expected = set(_tracked("reaper")) | {"reaper/_migrations/" + m.removeprefix("alembic/") for m in migrations}
    assert expected - names == set()
    assert not [n for n in names if n.startswith("alembic/")]  # never a top-level alembic that shadows the library


_OPEN_FRESH = """
import os, sys, alembic
import reaper.store
from reaper.store import HEAD_REVISION, MIGRATIONS, Store
s = Store.open("sqlite:///" + os.environ["DB"])
print(MIGRATIONS, s.db.current_revision() == HEAD_REVISION, s.runs.open_runs() == [], alembic.__file__)
s.close()
"""


def test_an_installed_wheel_upgrades_a_new_database_from_the_migrations_it_ships(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site), "DB": str(tmp_path / "new.sqlite")}
    done = subprocess.run([sys.executable, "-c", _OPEN_FRESH], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    migrations, at_head, empty, library = done.stdout.split()
    assert Path(migrations) == site / "reaper" / "_migrations"
    assert at_head == "True" and empty == "True"
    assert not Path(library).is_relative_to(site)


def test_the_alembic_folder_does_not_shadow_the_alembic_library() -> None:
    # run from the repository root, where ./alembic (the migrations, no __init__.py) is on sys.path first
    assert not (REPO / "alembic" / "__init__.py").exists()
    done = subprocess.run([sys.executable, "-c", "import alembic, alembic.command; print(alembic.__file__)"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not Path(done.stdout.strip()).is_relative_to(REPO)


LABEXT = "share/jupyter/labextensions/jupyterhub-reaper/"


def test_the_wheel_ships_the_prebuilt_jupyterlab_extension(wheel: Path) -> None:
    """Built from labextension/ when the wheel is built (the copy has no labextension/prebuilt/: the
    build made it), shipped as data files where JupyterLab looks for prebuilt extensions."""
    z = zipfile.ZipFile(wheel)
    data = next(n.split("/data/")[0] + "/data/" for n in z.namelist() if "/data/" + LABEXT in n)
    names = {n.removeprefix(data) for n in z.namelist() if n.startswith(data)}
    meta = json.loads(z.read(data + LABEXT + "package.json"))
    assert meta["name"] == "jupyterhub-reaper"
    assert LABEXT + meta["jupyterlab"]["_build"]["load"] in names  # static/remoteEntry.<hash>.js
    code = "".join(z.read(data + n).decode() for n in names if n.endswith(".js"))
    assert "jupyterhub-reaper:notice" in code and "no_track_activity" in code and "api/reaper/keep" in code


def test_an_installed_wheel_gives_jupyterlab_the_extension_without_node(wheel: Path, tmp_path: Path) -> None:
    """(--ignore-installed: pip must not touch this interpreter's own install of the reaper, editable or not)"""
    prefix = tmp_path / "prefix"
    before = subprocess.run([sys.executable, "-m", "pip", "show", "-f", "jupyterhub-reaper"], capture_output=True,
                            text=True).stdout
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", "--prefix",
                           str(prefix), str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert subprocess.run([sys.executable, "-m", "pip", "show", "-f", "jupyterhub-reaper"], capture_output=True,
                          text=True).stdout == before
    assert (prefix / LABEXT / "package.json").exists()
    no_node = {**os.environ, "PATH": str(Path(sys.executable).parent), "JUPYTER_PATH": str(prefix / "share/jupyter")}
    listed = subprocess.run([sys.executable, "-m", "jupyterlab.labextensions", "list"], env=no_node,
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    line = next((x for x in (listed.stdout + listed.stderr).splitlines() if "jupyterhub-reaper" in x), "")
    assert "enabled" in line and "OK" in line, listed.stdout + listed.stderr  # (colours: words between codes)
