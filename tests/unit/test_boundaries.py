"""The layers' import rules (and the companion's: reaper/singleuser runs in the user's environment and imports only
the standard library, tornado, jupyter_server, psutil and itself): the pure core (reaper/core) imports only the standard library,
itself and reaper.units (pure helpers for times and sizes, which import only the standard library); config.py imports no adapter (web, batch, notify, store, hub), so validating a file builds
none of them. Checked twice: the import statements as written (every one, also inside functions)
and the modules a fresh interpreter really loads."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "reaper" / "core"
PURE = ("reaper.core", "reaper.units")  # what the core may import of the project
ADAPTERS = ("reaper.web", "reaper.batch", "reaper.notify", "reaper.store", "reaper.hub")
# The one adapter config.py asks, late and only when notify.templates is set: the notice
# templates are rendered when the file is loaded, so check-config, start and SIGHUP reject a
# broken one (reaper.notify.render needs only the core and Jinja2).
CONFIG_LATE_IMPORTS = {"reaper.notify.render"}


def imports(path: Path, package: str) -> list[tuple[str, bool]]:
    """(absolute module name, at module level?) of every import in a file of ``package``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((name, id(node) in top))
    return out


def loaded_after(code: str) -> set[str]:
    r = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""}, check=True,
    )
    return set(json.loads(r.stdout.splitlines()[-1]))


def test_the_core_imports_only_the_standard_library_and_itself():
    files = sorted(CORE.glob("*.py"))
    assert {f.stem for f in files} >= {"model", "activity", "policy", "rules", "keep"}
    for f in files:
        for name, _ in imports(f, "reaper.core"):
            root = name.split(".")[0]
            assert name.startswith(PURE) or (root in sys.stdlib_module_names and root != "reaper"), (
                f"{f.relative_to(ROOT)} imports {name}: the core imports only the standard library, reaper.core "
                "and reaper.units"
            )


def test_units_imports_only_the_standard_library():
    for name, _ in imports(ROOT / "reaper" / "units.py", "reaper"):
        root = name.split(".")[0]
        assert root in sys.stdlib_module_names and root != "reaper", f"reaper/units.py imports {name}"


def test_importing_the_core_loads_no_pydantic_yaml_or_config():
    modules = [f"reaper.core.{f.stem}" for f in sorted(CORE.glob("*.py")) if f.stem != "__init__"]
    loaded = loaded_after("\n".join(f"import {m}" for m in modules))
    assert set(modules) <= loaded
    assert not {m for m in loaded if m.split(".")[0] in ("pydantic", "pydantic_core", "yaml")}
    assert not {m for m in loaded if m.startswith("reaper.") and not m.startswith(PURE)}


def test_config_imports_no_adapter():
    for name, at_top in imports(ROOT / "reaper" / "config.py", "reaper"):
        if name.startswith(ADAPTERS):
            assert not at_top and name in CONFIG_LATE_IMPORTS, f"reaper/config.py imports the adapter {name}"


def test_validating_a_whole_config_builds_no_adapter():
    """The shipped config.yaml has batch (system, commands, env, ...), slurm, orphans and web:
    validating them no longer builds a batch system nor imports the web app."""
    loaded = loaded_after(
        "from reaper.config import load_settings, choose_batch_system\n"
        f"s = load_settings({str(ROOT / 'config.yaml')!r}, env={{}})\n"
        "assert s.web.keep.policy().max_per_day == 3 and s.batch.command('squeue') == 'squeue'\n"
        "choose_batch_system(s.batch, lambda command: command == 'squeue')\n"
    )
    assert "reaper.config" in loaded
    assert not {m for m in loaded if m.startswith(ADAPTERS)}


# The companion runs in the USER's single-user environment, which has none of the reaper's dependencies.
SINGLEUSER = ROOT / "reaper" / "singleuser"
SINGLEUSER_MAY_IMPORT = ("tornado", "jupyter_server", "psutil")


def test_the_companion_imports_only_the_standard_library_tornado_jupyter_server_psutil_and_itself():
    files = sorted(SINGLEUSER.glob("*.py"))
    assert {f.stem for f in files} >= {"__init__", "activity", "processes"}
    for f in files:
        for name, _ in imports(f, "reaper.singleuser"):
            root = name.split(".")[0]
            assert (
                name == "reaper.singleuser" or name.startswith("reaper.singleuser.")
                or root in SINGLEUSER_MAY_IMPORT or (root in sys.stdlib_module_names and root != "reaper")
            ), f"{f.relative_to(ROOT)} imports {name}: the companion imports only the standard library, tornado, " \
               "jupyter_server, psutil and reaper.singleuser"


def test_loading_the_companion_loads_no_other_part_of_the_reaper():
    modules = [f"reaper.singleuser.{f.stem}" for f in sorted(SINGLEUSER.glob("*.py")) if f.stem != "__init__"]
    loaded = loaded_after("import reaper.singleuser\n" + "\n".join(f"import {m}" for m in modules))
    assert set(modules) <= loaded
    assert {m for m in loaded if m.startswith("reaper")} <= {"reaper", "reaper.singleuser", *modules}
    assert not {m for m in loaded if m.split(".")[0] in ("pydantic", "yaml", "sqlalchemy", "httpx", "alembic")}
