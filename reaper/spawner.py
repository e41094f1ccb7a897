"""Old import path of the Slurm spawner, kept so that a hub config written for an earlier release
(``c.JupyterHub.spawner_class = "reaper.spawner.SlurmSpawner"``) still starts. The spawner lives
in :mod:`reaper.hubside.spawner` (it runs inside the hub, not in the reaper service)."""

import warnings

from .hubside.spawner import *  # noqa: F403
from .hubside.spawner import SlurmSpawner

warnings.warn(
    "reaper.spawner is now reaper.hubside.spawner: set "
    'c.JupyterHub.spawner_class = "reaper.hubside.spawner.SlurmSpawner"',
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["SlurmSpawner"]
