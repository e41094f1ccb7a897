"""Code that runs inside the JupyterHub process, not in the reaper service: the Slurm spawner."""
