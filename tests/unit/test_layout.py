"""The layout's promises that code can check: old import paths kept for hub configs."""

import subprocess
import sys


def test_the_old_spawner_path_still_names_the_same_spawner_with_a_warning():
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "try:\n"
        "    import reaper.spawner\n"
        "except DeprecationWarning as w:\n"
        "    print('warned:', w)\n"
        "warnings.simplefilter('ignore')\n"
        "import reaper.spawner, reaper.hubside.spawner as h\n"
        "assert reaper.spawner.SlurmSpawner is h.SlurmSpawner\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "reaper.hubside.spawner.SlurmSpawner" in out
