#!/bin/bash
{#- The job script slurmformspawner renders (Jinja2) for the shipped hub (REAPER_HUB_SPAWNER=slurmform):
    slurmformspawner 2.11's own templates/submit.sh with its #SBATCH lines unchanged, except the
    job name (the reaper finds the hub's jobs by it: its slurm.job_name), and without the
    Alliance's paths (/opt/ipython-kernel, /opt/jupyterhub): the server starts from the hub's
    venv (cmd is the full path of batchspawner-singleuser and jupyterhub-singleuser). #}
{% if account %}#SBATCH --account="{{account}}"{% endif %}
#SBATCH --time={{runtime}}
#SBATCH --output={{homedir}}/.jupyterhub_slurmspawner_%j.log
#SBATCH --job-name=jupyterhub-reaper
#SBATCH --chdir={{homedir}}
#SBATCH --mem={{memory}}
#SBATCH --cpus-per-task={{nprocs}}
#SBATCH --export={{keepvars}}
{% if oversubscribe %}#SBATCH --oversubscribe{% endif %}
{% if reservation %}#SBATCH --reservation={{reservation}}{% endif %}
#SBATCH --gres={{gpus}}
{% if partition != "" %}#SBATCH --partition={{partition}}{% endif %}
{% if constraint != "" %}#SBATCH --constraint={{constraint}}{% endif %}
unset XDG_RUNTIME_DIR
export PATH="/usr/local/bin:/usr/bin:/bin${PATH:+:$PATH}"

{% if modules %}
module load {{modules|join(' ')}}
{% endif %}

# Launch jupyterhub single server
{{cmd}}
