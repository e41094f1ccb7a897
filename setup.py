"""The build step pyproject.toml cannot say: the JupyterLab extension (labextension/), prebuilt into the wheel.

When the wheel (or an sdist install, or an editable install) is built, ``build_py`` first builds the
TypeScript extension with @jupyterlab/builder from the npm registry (``npm ci`` then ``tsc`` and
``build-labextension``) if its output (labextension/prebuilt/) is missing or older than its sources,
then ships that output as data files in ``share/jupyter/labextensions/jupyterhub-reaper/``, where
JupyterLab finds it. A user's ``pip install`` of the wheel needs no Node. Building from a checkout
needs Node.js 18+ with npm, and JupyterLab 4 importable (its staging package is the builder's
``--core-path``); ``JUPYTERHUB_REAPER_SKIP_LABEXTENSION=1`` builds a wheel without the extension.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
LAB = HERE / "labextension"
OUT = LAB / "prebuilt"
NAME = "jupyterhub-reaper"  # labextension/package.json's name
SOURCES = ("src", "style", "package.json", "package-lock.json", "tsconfig.json")


def _newest(paths: list[Path]) -> float:
    stamps = [p.stat().st_mtime for top in paths if top.exists()
              for p in ([top] if top.is_file() else top.rglob("*")) if p.is_file()]
    return max(stamps, default=0.0)


def stale() -> bool:
    """No built extension, or a source newer than it."""
    if not (OUT / "package.json").exists():
        return True
    return _newest([LAB / s for s in SOURCES]) > _newest([OUT])


def core_path() -> str:
    try:
        import jupyterlab
    except ImportError:
        raise SystemExit("building the JupyterLab extension needs JupyterLab 4 importable (pip install jupyterlab), "
                         "or set JUPYTERHUB_REAPER_SKIP_LABEXTENSION=1") from None
    return str(Path(jupyterlab.__file__).parent / "staging")


def build_labextension() -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("building the JupyterLab extension needs Node.js and npm (or a prebuilt "
                         "labextension/prebuilt/); set JUPYTERHUB_REAPER_SKIP_LABEXTENSION=1 to build without it")
    bin_ = LAB / "node_modules" / ".bin"
    if not (bin_ / "build-labextension").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=LAB, check=True)
    subprocess.run([str(bin_ / "tsc"), "-p", "."], cwd=LAB, check=True)
    subprocess.run([str(bin_ / "build-labextension"), "--core-path", core_path(), "."], cwd=LAB, check=True,
                   stdout=subprocess.DEVNULL)
    os.utime(OUT / "package.json")


def data_files() -> list[tuple[str, list[str]]]:
    """(install folder, files) for every file of the built extension."""
    out: dict[str, list[str]] = {}
    for f in sorted(p for p in OUT.rglob("*") if p.is_file()):
        rel = f.relative_to(OUT).parent
        dest = f"share/jupyter/labextensions/{NAME}" + ("" if str(rel) == "." else f"/{rel.as_posix()}")
        out.setdefault(dest, []).append(f.relative_to(HERE).as_posix())
    return sorted(out.items())


class BuildPy(build_py):
    def run(self) -> None:
        if os.environ.get("JUPYTERHUB_REAPER_SKIP_LABEXTENSION") != "1" and LAB.exists():
            if stale():
                self.announce("building the JupyterLab extension (labextension/)", 2)
                build_labextension()
            self.distribution.data_files = [*(self.distribution.data_files or []), *data_files()]
        super().run()


if __name__ == "__main__":
    setup(cmdclass={"build_py": BuildPy})
