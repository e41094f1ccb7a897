# The minimal JupyterHub we ship with jupyterhub-reaper (JupyterHub 6).
#
#   jupyterhub -f hub/jupyterhub_config.py
#
# It wires three things: a spawner (local processes for a laptop demo, or Slurm batch jobs),
# a login (one shared password for demo and tests, or Google accounts as at Mila), and the
# reaper itself as a hub service with the least scopes it needs.
# Everything is driven by environment variables so that the same file serves the demo,
# the test harness (tests/harness/hub.py) and a first real deployment:
#
#   REAPER_HUB_STATE          folder for the hub's data files          (default ./.hub-state)
#   REAPER_HUB_IP             address the proxy and hub bind to        (default 127.0.0.1)
#   REAPER_HUB_PORT           public port of the proxy (users' URL)    (default 8000)
#   REAPER_HUB_API_PORT       port of the hub process itself           (default 8081)
#   REAPER_PROXY_API_PORT     REST port of configurable-http-proxy     (default 8001)
#   REAPER_PROXY_CMD          configurable-http-proxy executable       (default: next to python, else PATH)
#   REAPER_HUB_SPAWNER        "local" (default), or a Slurm spawner: "slurm" (ours, hardened),
#                             "batchspawner" (stock batchspawner.SlurmSpawner), "slurmform"
#                             (slurmformspawner.SlurmFormSpawner), "profiles" (wrapspawner's
#                             ProfilesSpawner over batchspawner.SlurmSpawner)
#   REAPER_HUB_POLL_INTERVAL  seconds between the hub's squeue polls    (default 30)
#   REAPER_HUB_EXEC_PREFIX    how batchspawner runs sbatch/scancel as the user
#                             (default "sudo -E -u {username}", or runuser where there is no sudo)
#   REAPER_HUB_SLURM_BIN      slurmform: folder of sbatch/scancel       (default: where sbatch is)
#   REAPER_HUB_SLURMFORM_TEMPLATE  slurmform: the job script template   (default hub/slurmform_submit.sh)
#   REAPER_HUB_HOMES          home folders for the local spawner       (default $REAPER_HUB_STATE/homes)
#   REAPER_HUB_AUTH           "shared-password" (default) or "google" (see "login" below)
#   REAPER_HUB_PASSWORD       the shared password of all users (8+)    (default: random, written to state)
#   REAPER_HUB_ADMINS         comma-separated admin user names         (default none)
#   REAPER_HUB_ADMIN_PASSWORD the admins' password (32+ characters)    (default: random, written to state)
#   REAPER_HUB_ADMIN_TOKEN    if set: an API token with the admin role (service "hub-admin")
#   REAPER_HUB_ACTIVITY_INTERVAL  seconds between activity updates     (default 300)
#   REAPER_HUB_LOG_LEVEL      hub log level                            (default INFO)
#   REAPER_HUB_COMPANION      "1": servers load the companion (reaper.singleuser); "0": never, even
#                             when their environment enables it; unset: as that environment says
#   REAPER_HUB_SINGLEUSER_PYTHONPATH  PYTHONPATH of the single-user servers (tests: the checkout, so a
#                             Slurm job, which inherits nothing from the hub, loads its companion)
#   REAPER_MANAGED            "1" (default): the hub starts and stops the reaper; "0": it does not
#   REAPER_CONFIG             the reaper's config file                 (default config.yaml in the repo)
#   REAPER_SERVICE_TOKEN      the reaper service's API token           (default: the hub makes one)
#   REAPER_SERVICE_URL        if set: where the reaper's web page listens (e.g. http://127.0.0.1:8123)
#   SLURM_CONF                passed through to sbatch/squeue/scancel in Slurm mode
#
# NOTE: never commit real tokens or passwords here: use the environment.
import os
import secrets
import sys
from pathlib import Path

c = get_config()  # noqa: F821  (provided by JupyterHub when it loads this file)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin/: jupyterhub-singleuser and the proxy live here


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value if value else default


def _flag(name: str, default: bool) -> bool:
    return _env(name, "1" if default else "0").lower() not in ("0", "false", "no", "off")


# --- data files -----------------------------------------------------------------------------
# The hub's database, cookie secret, proxy token and proxy pid file all live in one folder,
# so a demo is wiped by deleting that folder and nothing lands in the current directory.
STATE = Path(_env("REAPER_HUB_STATE", ".hub-state")).resolve()
STATE.mkdir(parents=True, exist_ok=True, mode=0o700)
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(STATE / "jupyterhub-proxy.pid")


def _secret_file(name: str) -> str:
    """A random secret kept in the state folder (mode 0600), made on first use."""
    path = STATE / name
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


# The token the hub uses to talk to configurable-http-proxy's REST API.
c.ConfigurableHTTPProxy.auth_token = _env("CONFIGPROXY_AUTH_TOKEN", "") or _secret_file("proxy-auth-token")

# --- network: loopback by default --------------------------------------------------------------
IP = _env("REAPER_HUB_IP", "127.0.0.1")
# Users (and browsers) reach everything through the proxy at this URL.
c.JupyterHub.bind_url = f"http://{IP}:{int(_env('REAPER_HUB_PORT', '8000'))}"
# The hub process itself (REST API at /hub/api), reached by the proxy, servers and services.
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{int(_env('REAPER_HUB_API_PORT', '8081'))}"
# The proxy's own REST API (route table), used only by the hub.
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{int(_env('REAPER_PROXY_API_PORT', '8001'))}"
# The hub starts the proxy itself and stops it on shutdown.
c.ConfigurableHTTPProxy.should_start = True
_chp = BIN / "configurable-http-proxy"
c.ConfigurableHTTPProxy.command = [
    _env("REAPER_PROXY_CMD", str(_chp) if _chp.exists() else "configurable-http-proxy")
]
c.JupyterHub.log_level = _env("REAPER_HUB_LOG_LEVEL", "INFO")

# --- activity --------------------------------------------------------------------------------
# How often the hub polls the proxy for route activity, and how often each single-user server
# pushes its own activity to the hub. JupyterHub's default is 300 s for both; tests use ~2 s so
# that "the hub's last_activity did (not) move" can be checked within seconds.
ACTIVITY_INTERVAL = int(_env("REAPER_HUB_ACTIVITY_INTERVAL", "300"))
c.JupyterHub.last_activity_interval = ACTIVITY_INTERVAL
# Activity newer by less than this many seconds is ignored by the hub (default 30 s); it must not
# be coarser than the interval above, or short test intervals would see no movement at all.
c.JupyterHub.activity_resolution = min(30, ACTIVITY_INTERVAL)
# Stop users' servers when the hub shuts down (JupyterHub's default, stated on purpose: the
# test harness relies on it to leave no single-user processes or Slurm jobs behind).
c.JupyterHub.cleanup_servers = True
# Users may run several named servers; the reaper treats each server run on its own.
c.JupyterHub.allow_named_servers = True

# --- spawner ---------------------------------------------------------------------------------
c.Spawner.environment = {"JUPYTERHUB_ACTIVITY_INTERVAL": str(ACTIVITY_INTERVAL)}
# Start the single-user server from this very environment (the venv must be readable by users).
_singleuser = BIN / "jupyterhub-singleuser"
if _singleuser.exists():
    c.Spawner.cmd = [str(_singleuser)]
c.Spawner.ip = "127.0.0.1"
# The server's own token (JUPYTERHUB_API_TOKEN) may stop that one server: JupyterLab's "Stop now" on the
# reaper's notice asks the hub with it (reaper/singleuser/notice.py). The first two are JupyterHub's
# default server role; the hub turns "!server" into this server (delete:servers!server=USER/NAME). A site
# that leaves delete:servers out gets a clear "stop it from the hub's control panel" in JupyterLab instead.
c.Spawner.server_token_scopes = ["users:activity!user", "access:servers!server", "delete:servers!server"]
c.Spawner.start_timeout = 120  # a Slurm job may wait in the queue a little
c.Spawner.http_timeout = 60

SPAWNER = _env("REAPER_HUB_SPAWNER", "local").lower()
SPAWNERS = ("local", "slurm", "batchspawner", "slurmform", "profiles")
if SPAWNER not in SPAWNERS:
    raise ValueError(f"REAPER_HUB_SPAWNER must be one of {', '.join(SPAWNERS)}, not {SPAWNER!r}")
LOOPBACK = IP in ("127.0.0.1", "localhost")

if SPAWNER != "local":
    # Every other choice runs notebooks as Slurm batch jobs through batchspawner.
    # Importing batchspawner registers /hub/api/batchspawner, which the job calls to report
    # its host and port back to the hub.
    import batchspawner  # noqa: F401

    # The job starts the server through batchspawner's wrapper (it reports the port back to the
    # hub); name it by full path, as the job's PATH need not contain this venv.
    _wrapper = BIN / "batchspawner-singleuser"
    if _wrapper.exists():
        c.BatchSpawnerBase.batchspawner_singleuser_cmd = str(_wrapper)
    # batchspawner runs sbatch/squeue/scancel with the spawner's environment only: without
    # SLURM_CONF there they fail with a DNS SRV lookup error on machines configured that way.
    if os.environ.get("SLURM_CONF"):
        c.Spawner.environment["SLURM_CONF"] = os.environ["SLURM_CONF"]
    # How often the hub polls each job (squeue); the default 30 s is fine on a real cluster.
    c.Spawner.poll_interval = int(_env("REAPER_HUB_POLL_INTERVAL", "30"))
    # batchspawner ignores Spawner.ip and binds 0.0.0.0: keep the server on loopback unless
    # the site sets REAPER_HUB_IP to something else (real clusters need the node's address).
    if LOOPBACK:
        c.Spawner.args = ["--ServerApp.ip=127.0.0.1"]
    # Stock batchspawner runs its commands as the user with `sudo -E -u {username}` (real sites);
    # where there is no sudo (containers, these test machines, as root) runuser does the same.
    import shutil as _shutil

    _EXEC_PREFIX = _env(
        "REAPER_HUB_EXEC_PREFIX",
        "sudo -E -u {username}" if _shutil.which("sudo") else "runuser -u {username} --",
    )

if SPAWNER == "slurm":
    # Notebooks run as Slurm batch jobs, through the hardened spawner we ship.
    c.JupyterHub.spawner_class = "reaper.hubside.spawner.SlurmSpawner"
    # What users may ask for (the spawn form, and user_options over the REST API); anything
    # else is refused before a job is submitted. Policy rules in the reaper's config.yaml can
    # match on these options (partition, gpus).
    c.SlurmSpawner.partition_choices = ["cpu", "gpu"]
    c.SlurmSpawner.gpu_partitions = ["gpu"]
    c.SlurmSpawner.max_gpus = 2
    c.SlurmSpawner.runtime_choices = ["2:00:00", "8:00:00", "1-00:00:00"]
    c.SlurmSpawner.memory_choices = ["4G", "16G", "32G"]
    # The name the reaper looks for to find the hub's jobs (its slurm.job_name).
    c.SlurmSpawner.job_name = "jupyterhub-reaper"
elif SPAWNER in ("batchspawner", "profiles"):
    # Stock batchspawner.SlurmSpawner (batchspawner 1.3), as most sites run it: its own batch
    # script (job name "spawner-jupyterhub": set the reaper's slurm.job_name to it), the job id
    # in the spawner state, no server address there (the reaper reads it from the proxy table).
    # user_options over the REST API fill the script's variables (partition, runtime, memory,
    # nprocs, gres ...): batchspawner does not check them, so only admins should use that.
    c.BatchSpawnerBase.exec_prefix = _EXEC_PREFIX
    if LOOPBACK:
        # the hub connects to the node squeue names; on one machine that is loopback
        c.SlurmSpawner.state_exechost_exp = "127.0.0.1"
    if SPAWNER == "batchspawner":
        c.JupyterHub.spawner_class = "batchspawner.SlurmSpawner"
    else:
        # wrapspawner's ProfilesSpawner: the user picks a profile (user_options {"profile": KEY});
        # each profile is the stock SlurmSpawner with its own resources. The hub keeps the child
        # spawner's state nested ({"profile", "child_conf": {req_*}, "child_state": {"job_id"...}});
        # the reaper reads the job id and the requested resources from there.
        c.JupyterHub.spawner_class = "wrapspawner.ProfilesSpawner"
        c.ProfilesSpawner.profiles = [
            ("CPU: 1 core, 2 GB, 2 hours", "cpu", "batchspawner.SlurmSpawner",
             {"req_partition": "cpu", "req_nprocs": "1", "req_memory": "2G", "req_runtime": "2:00:00"}),
            ("GPU: 1 GPU, 4 GB, 4 hours", "gpu", "batchspawner.SlurmSpawner",
             {"req_partition": "gpu", "req_nprocs": "1", "req_memory": "4G", "req_runtime": "4:00:00",
              "req_gres": "gpu:1"}),
        ]
elif SPAWNER == "slurmform":
    # slurmformspawner's SlurmFormSpawner (2.11, as the Alliance runs it): a form built from the
    # cluster (runtime in hours, cores, memory in MB, GPUs "gpu:N", partition ...). It takes its
    # options from that form only (user_options sent over the REST API are ignored), and the
    # hub's server model shows them as the spawner converts them: runtime in MINUTES, memory MB.
    from slurmformspawner.spawner import SlurmFormSpawner

    class ReaperSlurmFormSpawner(SlurmFormSpawner):
        """SlurmFormSpawner with its commands run through the exec prefix above: the stock class
        hard-codes `sudo` in its sbatch/scancel command lines (class attributes, not config)."""

        batch_submit_cmd = (
            _EXEC_PREFIX.replace("sudo -E", "sudo --preserve-env={keepvars}")
            + " {slurm_bin_path}/sbatch --parsable"
        )
        batch_cancel_cmd = _EXEC_PREFIX + " {slurm_bin_path}/scancel {job_id}"

    c.JupyterHub.spawner_class = ReaperSlurmFormSpawner
    _sbatch = _shutil.which("sbatch")
    c.SlurmFormSpawner.slurm_bin_path = _env(
        "REAPER_HUB_SLURM_BIN", os.path.dirname(_sbatch) if _sbatch else "/usr/bin"
    )
    # The stock submit template activates the Alliance's own paths (/opt/ipython-kernel,
    # /opt/jupyterhub); ours keeps its #SBATCH lines and starts the server from this venv.
    c.SlurmFormSpawner.submit_template_path = _env(
        "REAPER_HUB_SLURMFORM_TEMPLATE", str(REPO / "hub" / "slurmform_submit.sh")
    )
    if LOOPBACK:
        c.SlurmSpawner.state_exechost_exp = "127.0.0.1"
    # The form: partitions the user may pick (the stock form locks it to the default), the
    # runtime in hours.
    c.SbatchForm.partition = {"lock": False, "def": "cpu", "choices": ["cpu", "gpu"]}
    c.SbatchForm.runtime = {"min": 0.25, "def": 1.0, "max": 24.0, "step": 0.25}
    c.SbatchForm.ui = {"lock": False, "def": "lab", "choices": ["lab", "notebook"]}
else:
    # Every user's server is a local process of the hub's own unix user (no isolation: demo
    # and tests only), with its home folder under the state folder.
    c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
    c.SimpleLocalProcessSpawner.home_dir_template = str(
        Path(_env("REAPER_HUB_HOMES", str(STATE / "homes"))).resolve() / "{username}"
    )
    # jupyter_server refuses to run as root without this flag; we are root on the test machines.
    if os.geteuid() == 0:
        c.Spawner.args = ["--allow-root"]

# --- the companion extension in the single-user servers ------------------------------------------
# `pip install jupyterhub-reaper[singleuser]` in the servers' environment enables it by itself (a
# jupyter_server_config.d file); this switch forces it on or off, for tests and demos from one venv.
# A command-line setting wins over the config.d files (ServerApp.find_server_extensions). The key=value
# form has no space or quote: batchspawner joins the arguments into its batch script unquoted.
_companion = _env("REAPER_HUB_COMPANION", "").lower()
if _companion:
    _on = _companion not in ("0", "false", "no", "off")
    c.Spawner.args.append(f"--ServerApp.jpserver_extensions=reaper.singleuser={_on}")
if _env("REAPER_HUB_SINGLEUSER_PYTHONPATH", ""):
    c.Spawner.environment["PYTHONPATH"] = _env("REAPER_HUB_SINGLEUSER_PYTHONPATH", "")

# --- login -----------------------------------------------------------------------------------
# REAPER_HUB_AUTH picks how users log in:
#
#   shared-password (default): one shared password for every (non-admin) user name: good for a
#     demo and for tests that log in as users, never for production. This is JupyterHub 5.3+'s
#     replacement for DummyAuthenticator's password. Without REAPER_HUB_PASSWORD (at least 8
#     characters) a random password is made and kept in $REAPER_HUB_STATE/user-password; admins
#     listed in REAPER_HUB_ADMINS log in with REAPER_HUB_ADMIN_PASSWORD (at least 32 characters;
#     default random, in admin-password).
#
#   google: Google accounts of your organisation, as at Mila (oauthenticator's GoogleOAuthenticator):
#     REAPER_GOOGLE_CLIENT_ID       the OAuth client's id (Google Cloud console; or $OAUTH_CLIENT_ID)
#     REAPER_GOOGLE_CLIENT_SECRET   its secret (or $OAUTH_CLIENT_SECRET); never passed to the reaper
#     REAPER_GOOGLE_CALLBACK_URL    https://<your hub>/hub/oauth_callback, as registered at Google
#                                   (or $OAUTH_CALLBACK_URL)
#     REAPER_GOOGLE_HOSTED_DOMAIN   required: the Google Workspace domain(s), comma-separated, e.g.
#                                   mila.quebec. Only accounts of these domains sign in (Google's
#                                   "hd" claim). With ONE domain it is stripped from the user name:
#                                   my_username@mila.quebec => my_username; with several, user
#                                   names are the whole addresses.
#     REAPER_HUB_ALLOW              who of those may log in:
#                                   existing (default): users the hub already has (made by an admin,
#                                     or listed in REAPER_HUB_ALLOWED_USERS / REAPER_HUB_ADMINS);
#                                   all: every account of the hosted domain(s) (Mila's page).
#     REAPER_HUB_ALLOWED_USERS      comma-separated user names allowed besides (after the map below)
#     REAPER_HUB_USERNAME_MAP       a JSON or YAML file {login name: cluster user name}, for people
#                                   whose cluster login differs from their mail name
#                                   (Authenticator.username_map; keys are the names after the
#                                   domain is stripped, lower case)
_AUTH = _env("REAPER_HUB_AUTH", "shared-password").lower()
ADMINS = {u.strip() for u in _env("REAPER_HUB_ADMINS", "").split(",") if u.strip()}
c.Authenticator.admin_users = ADMINS
if _AUTH == "shared-password":
    c.JupyterHub.authenticator_class = "shared-password"
    c.SharedPasswordAuthenticator.user_password = _env("REAPER_HUB_PASSWORD", "") or _secret_file("user-password")
    c.Authenticator.allow_all = True
    if ADMINS:
        c.SharedPasswordAuthenticator.admin_password = _env("REAPER_HUB_ADMIN_PASSWORD", "") or _secret_file(
            "admin-password"
        )
elif _AUTH == "google":
    c.JupyterHub.authenticator_class = "google"
    for _trait, _var in (("client_id", "REAPER_GOOGLE_CLIENT_ID"), ("client_secret", "REAPER_GOOGLE_CLIENT_SECRET"),
                         ("oauth_callback_url", "REAPER_GOOGLE_CALLBACK_URL")):
        if _env(_var, ""):  # else oauthenticator's own $OAUTH_CLIENT_ID, $OAUTH_CLIENT_SECRET, $OAUTH_CALLBACK_URL
            setattr(c.GoogleOAuthenticator, _trait, _env(_var, ""))
    _missing = [v for v, fallback in (("REAPER_GOOGLE_CLIENT_ID", "OAUTH_CLIENT_ID"),
                                      ("REAPER_GOOGLE_CLIENT_SECRET", "OAUTH_CLIENT_SECRET"))
                if not _env(v, "") and not _env(fallback, "")]
    DOMAINS = [d.strip().lower() for d in _env("REAPER_GOOGLE_HOSTED_DOMAIN", "").split(",") if d.strip()]
    if not DOMAINS:
        _missing.append("REAPER_GOOGLE_HOSTED_DOMAIN")
    if _missing:
        raise ValueError(f"REAPER_HUB_AUTH=google needs {', '.join(_missing)} (see hub/jupyterhub_config.py)")
    c.GoogleOAuthenticator.hosted_domain = DOMAINS
    # Google's hint: its sign-in page offers only accounts of that domain ("*": any Workspace
    # domain); the check that counts is oauthenticator's, of the "hd" claim, after sign-in.
    c.GoogleOAuthenticator.extra_authorize_params = {"hd": DOMAINS[0] if len(DOMAINS) == 1 else "*"}
    _allow = _env("REAPER_HUB_ALLOW", "existing").lower()
    if _allow == "all":
        c.GoogleOAuthenticator.allow_all = True
    elif _allow == "existing":
        c.GoogleOAuthenticator.allow_existing_users = True
    else:
        raise ValueError(f"REAPER_HUB_ALLOW must be 'existing' or 'all', not {_allow!r}")
    c.GoogleOAuthenticator.allowed_users = {
        u.strip().lower() for u in _env("REAPER_HUB_ALLOWED_USERS", "").split(",") if u.strip()
    }
    if _env("REAPER_HUB_USERNAME_MAP", ""):
        import yaml  # a JSON file is YAML too

        _map = yaml.safe_load(Path(_env("REAPER_HUB_USERNAME_MAP", "")).read_text()) or {}
        if not isinstance(_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in _map.items()):
            raise ValueError("REAPER_HUB_USERNAME_MAP: the file must map login names to cluster user names")
        c.Authenticator.username_map = {k.strip().lower(): v.strip() for k, v in _map.items()}
else:
    raise ValueError(f"REAPER_HUB_AUTH must be 'shared-password' or 'google', not {_AUTH!r}")

# --- the reaper service ----------------------------------------------------------------------
reaper_service: dict = {"name": "reaper"}
# A fixed token lets something outside the hub (the test harness, or a reaper run by hand with
# `jupyterhub-reaper sweep`) act as the service. For a managed service the hub hands this same
# token to the process as JUPYTERHUB_API_TOKEN; without it the hub makes a fresh one at startup.
if os.environ.get("REAPER_SERVICE_TOKEN"):
    reaper_service["api_token"] = os.environ["REAPER_SERVICE_TOKEN"]
if _env("REAPER_SERVICE_URL", ""):
    # The reaper's web page (status and explanations), served under /services/reaper/ with hub login.
    reaper_service["url"] = _env("REAPER_SERVICE_URL", "")
    reaper_service["oauth_no_confirm"] = True
if _flag("REAPER_MANAGED", True):
    # Managed: the hub starts the reaper with the hub, restarts it if it dies, stops it on shutdown.
    reaper_service["command"] = [
        sys.executable,
        "-m",
        "reaper.cli",
        "run",
        "--config",
        _env("REAPER_CONFIG", str(REPO / "config.yaml")),
    ]
    reaper_service["cwd"] = str(REPO)
    # A managed service only sees PATH, LANG and the like from the hub's environment: pass the
    # reaper's own settings (REAPER_*) and SLURM_CONF on, but no secret the hub holds for others.
    _secret = {
        "REAPER_SERVICE_TOKEN",
        "REAPER_HUB_ADMIN_TOKEN",
        "REAPER_HUB_PASSWORD",
        "REAPER_HUB_ADMIN_PASSWORD",
        "REAPER_GOOGLE_CLIENT_SECRET",
    }
    reaper_service["environment"] = {
        k: v
        for k, v in os.environ.items()
        if (k.startswith("REAPER_") and k not in _secret) or k == "SLURM_CONF"
    }
    if _AUTH == "google" and len(DOMAINS) == 1:
        # user names are the mail names: the notices' default address (config.yaml) follows the domain
        reaper_service["environment"].setdefault("REAPER_MAIL_DOMAIN", DOMAINS[0])

c.JupyterHub.services = [reaper_service]
c.JupyterHub.load_roles = [
    {
        "name": "reaper",
        "description": "Least privilege for jupyterhub-reaper",
        "scopes": [
            # list users, following pagination (collect step)
            "list:users",
            # users' last_activity, to tell idle from active
            "read:users:activity",
            # users' groups, for per-group policy rules and exemptions
            "read:users:groups",
            # server models: started, last_activity, ready, pending, user_options
            "read:servers",
            # stop a server (the only action that changes anything for a user)
            "delete:servers",
            # spawner state (Slurm job_id), to check the job is really gone and scancel orphans
            "admin:server_state",
            # reach the single-user servers' /api/status, /api/kernels, /api/terminals probes
            "access:servers",
            # read the proxy route table: each server's own address, so probes bypass the proxy
            # (probes through the proxy count as activity and would keep every server alive)
            "proxy",
        ],
        "services": ["reaper"],
    }
]

# Users may open the reaper's page (their own servers, "Keep running", "Stop now"), linked from
# every notice: the default user role only grants "self".
c.JupyterHub.load_roles.append(
    {"name": "user", "description": "Default user role, plus the reaper's page",
     "scopes": ["self", "access:services!service=reaper"]}
)

# Optional: an admin token for automation and the test harness (never needed by the reaper).
if os.environ.get("REAPER_HUB_ADMIN_TOKEN"):
    c.JupyterHub.services.append({"name": "hub-admin", "api_token": os.environ["REAPER_HUB_ADMIN_TOKEN"]})
    c.JupyterHub.load_roles.append({"name": "admin", "services": ["hub-admin"]})
