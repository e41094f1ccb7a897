"""A real JupyterHub (6.x, or 5.4.x) for tests: the shipped hub/jupyterhub_config.py run as a subprocess.

    hub = RealHub(tmp_path / "hub")          # managed reaper service OFF by default
    hub = RealHub(tmp_path / "hub", version="5.4")   # the same, from the JupyterHub 5.4 venv
    hub.start()                               # ~2 s; waits until /hub/api/ answers 200 via the proxy
    hub.create_user("alice", groups=["gpu"])
    hub.start_server("alice")                 # waits until the server is ready
    kid = hub.start_kernel("alice")
    ws = hub.open_kernel_ws("alice", kid)     # a real websocket: the kernel shows connections == 1
    hub.execute(ws, "import time; time.sleep(30)")   # the kernel is busy
    ws.close()
    hub.stop()                                # SIGTERM, then SIGKILL of every process group it made

Everything is synchronous (httpx.Client, websocket-client): the hub is another process, so a test
may call these helpers from async code between awaits without harm.
All servers bind 127.0.0.1 on free ports. The hub's log goes to `hub.log_path`.

Versions: "6" is the venv running the tests (JupyterHub 6.x); "5.4" is the venv that
`scripts/setup.sh --test` makes with the newest jupyterhub 5.4.x (REAPER_VENV54, default
/opt/jupyterhub-reaper/venv-hub54). A hub runs everything (jupyterhub, the proxy, the single-user
servers, a managed reaper) from its version's venv; `start()` checks the hub's answered version.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import websocket  # websocket-client

from reaper.units import parse_iso

REPO = Path(__file__).resolve().parents[2]
HUB_CONFIG = REPO / "hub" / "jupyterhub_config.py"
BIN = Path(sys.executable).parent

# The JupyterHub versions the core-path tests run against, and the default one.
HUB_VERSIONS = ("5.4", "6")
DEFAULT_VERSION = "6"
VENV54_DEFAULT = "/opt/jupyterhub-reaper/venv-hub54"


def hub_bin(version: str = DEFAULT_VERSION) -> Path:
    """The bin/ folder of the venv that runs a hub of `version` ("6": this venv; "5.4": REAPER_VENV54)."""
    if version == DEFAULT_VERSION:
        return BIN
    if version == "5.4":
        return Path(os.environ.get("REAPER_VENV54") or VENV54_DEFAULT) / "bin"
    raise ValueError(f"unknown hub version {version!r} (one of {HUB_VERSIONS})")

PAGINATION_ACCEPT = "application/jupyterhub-pagination+json"

# The scopes the shipped config gives the "reaper" role (documented in hub/jupyterhub_config.py).
REAPER_SCOPES = frozenset(
    {
        "list:users",
        "read:users:activity",
        "read:users:groups",
        "read:servers",
        "delete:servers",
        "admin:server_state",
        "access:servers",
        "proxy",
    }
)


class HubError(RuntimeError):
    """The real hub did not do what the harness asked; the message carries the hub's log tail."""


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def parse_time(value: str | None) -> datetime | None:
    """JupyterHub/jupyter_server ISO 8601 timestamps ('...Z') -> aware UTC datetime (reaper.units)."""
    return parse_iso(value) if value else None


def jupyterhub_executable(version: str = DEFAULT_VERSION) -> str | None:
    cand = hub_bin(version) / "jupyterhub"
    if cand.exists():
        return str(cand)
    return shutil.which("jupyterhub") if version == DEFAULT_VERSION else None


def proxy_executable(version: str = DEFAULT_VERSION) -> str | None:
    cand = hub_bin(version) / "configurable-http-proxy"
    if cand.exists():
        return str(cand)
    return shutil.which("configurable-http-proxy")


def missing_parts(version: str = DEFAULT_VERSION) -> list[str]:
    """What a RealHub of `version` needs that this machine lacks (empty when it can start)."""
    missing = []
    if not jupyterhub_executable(version):
        missing.append(
            "jupyterhub" if version == DEFAULT_VERSION
            else f"jupyterhub {version} (its venv {hub_bin(version).parent}: scripts/setup.sh --test)"
        )
    if not proxy_executable(version):
        missing.append("configurable-http-proxy")
    if not shutil.which("node"):
        missing.append("node (for configurable-http-proxy)")
    return missing


# --- process bookkeeping ------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) for every process visible in /proc."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may contain spaces and parentheses: split after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def descendants(root: int) -> set[int]:
    """Every live process under `root` (children, grandchildren, ...), not root itself."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _pgid) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def processes_with_env(exact: Iterable[bytes] = (), prefixes: Iterable[bytes] = ()) -> set[int]:
    """Live processes whose environment holds a variable equal to one of `exact` (b"KEY=value")
    or starting with one of `prefixes`: finds what a hub started even after the hub died and its
    children were reparented to init."""
    exact_set, prefix_tuple = set(exact), tuple(prefixes)
    found: set[int] = set()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if any(var in exact_set or (prefix_tuple and var.startswith(prefix_tuple)) for var in env):
            found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rfind(")") + 2 :].split()[0] != "Z"
    except OSError:
        return False


# --- kernel websocket -------------------------------------------------------------------------


class KernelChannel:
    """An open websocket to /api/kernels/ID/channels; a reader thread keeps every message
    (and answers the server's pings). While open, the kernel reports connections == 1."""

    def __init__(self, url: str, headers: Mapping[str, str], kernel_id: str, timeout: float = 30) -> None:
        self.kernel_id = kernel_id
        self.session = uuid.uuid4().hex
        self._ws = websocket.create_connection(
            url, header=[f"{k}: {v}" for k, v in headers.items()], timeout=timeout
        )
        self._ws.settimeout(None)
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self._seen: list[dict[str, Any]] = []
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name=f"kernel-ws-{kernel_id[:8]}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                raw = self._ws.recv()
            except Exception:
                break
            if not raw:
                break
            if isinstance(raw, bytes):
                continue  # binary protocol frames: not used by our requests
            with contextlib.suppress(ValueError):
                self.messages.put(json.loads(raw))
        self._closed.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def send(self, channel: str, msg_type: str, content: dict[str, Any]) -> str:
        msg_id = uuid.uuid4().hex
        msg = {
            "header": {
                "msg_id": msg_id,
                "msg_type": msg_type,
                "username": "harness",
                "session": self.session,
                "date": datetime.now(UTC).isoformat(),
                "version": "5.3",
            },
            "parent_header": {},
            "metadata": {},
            "content": content,
            "channel": channel,
            "buffers": [],
        }
        self._ws.send(json.dumps(msg))
        return msg_id

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
        """The first message (already received or coming) that matches `predicate`."""
        for msg in self._seen:
            if predicate(msg):
                return msg
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"kernel {self.kernel_id}: no matching message within {timeout}s")
            try:
                msg = self.messages.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.closed:
                    raise ConnectionError(f"kernel {self.kernel_id}: websocket closed") from None
                continue
            self._seen.append(msg)
            if predicate(msg):
                return msg

    def reply_to(self, msg_id: str, timeout: float = 30) -> dict[str, Any]:
        return self.wait_for(
            lambda m: (
                m.get("parent_header", {}).get("msg_id") == msg_id
                and m.get("msg_type", "").endswith("_reply")
            ),
            timeout,
        )

    def wait_idle(self, msg_id: str, timeout: float = 60) -> dict[str, Any]:
        """Wait for the kernel's status 'idle' that ends the request `msg_id`."""
        return self.wait_for(
            lambda m: (
                m.get("parent_header", {}).get("msg_id") == msg_id
                and m.get("msg_type") == "status"
                and m.get("content", {}).get("execution_state") == "idle"
            ),
            timeout,
        )

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(Exception):
            self._ws.close()
        self._reader.join(timeout=5)

    def __enter__(self) -> KernelChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the hub --------------------------------------------------------------------------------------


class RealHub:
    """A real JupyterHub subprocess from hub/jupyterhub_config.py, with its own state folder.

    managed: start the reaper as a managed hub service (REAPER_MANAGED=1); off by default,
        because most tests run sweeps in-process with `service_token`.
    spawner: "local" (SimpleLocalProcessSpawner), "slurm" (reaper.hubside.spawner.SlurmSpawner),
        "batchspawner", "slurmform" or "profiles" (hub/jupyterhub_config.py; pass SLURM_CONF and the
        like in extra_env).
    version: "6" (default) or "5.4": the JupyterHub version, i.e. the venv it runs from (hub_bin).
    activity_interval: the hub's last_activity_interval and the servers' JUPYTERHUB_ACTIVITY_INTERVAL.
    auth: the shipped config's REAPER_HUB_AUTH ("shared-password", or "google" with its
        REAPER_GOOGLE_* settings in extra_env).
    companion: the single-user servers load the companion extension reaper.singleuser (on by default;
        False: never, even where their environment enables it). Servers run from this venv with this
        process's PYTHONPATH (REAPER_HUB_SINGLEUSER_PYTHONPATH: the local spawner would keep it, a Slurm
        job would not), so they load the checkout's reaper.singleuser.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        managed: bool = False,
        spawner: str = "local",
        activity_interval: int = 2,
        reaper_config: Path | None = None,
        service_url: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        config_file: Path = HUB_CONFIG,
        auth: str = "shared-password",
        companion: bool = True,
        version: str = DEFAULT_VERSION,
    ) -> None:
        self.version = version
        self.bin = hub_bin(version)
        self.hub_version: str | None = None  # what the hub answers at /hub/api/, once started
        self.workdir = Path(workdir).resolve()
        self.state_dir = self.workdir / "state"
        self.log_path = self.workdir / "jupyterhub.log"
        self.managed = managed
        self.spawner = spawner
        self.activity_interval = activity_interval
        self.reaper_config = reaper_config
        self.service_url = service_url
        self.extra_env = dict(extra_env or {})
        self.config_file = config_file
        self.auth = auth
        self.companion = companion
        self.public_port, self.hub_port, self.proxy_api_port = free_ports(3)
        self.admin_token = secrets.token_hex(32)
        self.service_token = secrets.token_hex(32)
        self.password = secrets.token_urlsafe(16)
        self.base_url = f"http://127.0.0.1:{self.public_port}"
        self.hub_url = f"http://127.0.0.1:{self.hub_port}"
        self.api_url = f"{self.hub_url}/hub/api"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._client: httpx.Client | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
        env.update(
            {
                "PATH": f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
                "REAPER_HUB_STATE": str(self.state_dir),
                "REAPER_HUB_IP": "127.0.0.1",
                "REAPER_HUB_PORT": str(self.public_port),
                "REAPER_HUB_API_PORT": str(self.hub_port),
                "REAPER_PROXY_API_PORT": str(self.proxy_api_port),
                "REAPER_HUB_SPAWNER": self.spawner,
                "REAPER_HUB_HOMES": str(self.workdir / "homes"),
                "REAPER_HUB_PASSWORD": self.password,
                "REAPER_HUB_ADMIN_TOKEN": self.admin_token,
                "REAPER_SERVICE_TOKEN": self.service_token,
                "REAPER_HUB_ACTIVITY_INTERVAL": str(self.activity_interval),
                "REAPER_MANAGED": "1" if self.managed else "0",
                "REAPER_HUB_AUTH": self.auth,
                "REAPER_HUB_COMPANION": "1" if self.companion else "0",
            }
        )
        if env.get("PYTHONPATH"):
            env["REAPER_HUB_SINGLEUSER_PYTHONPATH"] = env["PYTHONPATH"]
        env.pop("CONFIGPROXY_AUTH_TOKEN", None)
        if self.reaper_config is not None:
            env["REAPER_CONFIG"] = str(self.reaper_config)
        if self.service_url:
            env["REAPER_SERVICE_URL"] = self.service_url
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60) -> RealHub:
        exe = jupyterhub_executable(self.version)
        if exe is None:
            raise HubError(f"jupyterhub {self.version} executable not found ({self.bin})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [exe, "-f", str(self.config_file)],
            cwd=self.workdir,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole in stop()
        )
        self._client = httpx.Client(timeout=30)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise HubError(f"jupyterhub exited with {self.proc.returncode} while starting")
                with contextlib.suppress(httpx.HTTPError):
                    r = self._client.get(f"{self.base_url}/hub/api/", timeout=2)
                    if r.status_code == 200:
                        self.hub_version = str(r.json().get("version", ""))
                        if not (self.hub_version + ".").startswith(self.version + "."):
                            raise HubError(f"asked for JupyterHub {self.version}, it answers {self.hub_version}")
                        return self
                if time.monotonic() > deadline:
                    raise HubError(f"/hub/api/ did not answer 200 through the proxy within {timeout}s")
                time.sleep(0.1)
        except BaseException as e:
            self.stop()
            if isinstance(e, HubError):
                raise HubError(f"{e}\n--- hub log ---\n{self.log_tail()}") from None
            raise

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the hub (it stops servers, services and the proxy), then SIGKILL every process
        group it made that is still alive: no CHP, single-user server or kernel is left behind."""
        proc, self.proc = self.proc, None
        if proc is not None:
            tree = descendants(proc.pid) | self._own_processes()
            groups = {proc.pid}
            table = _proc_table()
            groups |= {table[p][1] for p in tree if p in table}
            chp = self._proxy_pid()
            if chp:
                tree.add(chp)
            groups.discard(os.getpgrp())
            groups.discard(0)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            # what the hub started in new sessions (proxy, servers, services, kernels), also
            # when the hub had died before and they were reparented
            late = self._own_processes()
            tree |= late
            groups |= {pgid for p, (_pp, pgid) in _proc_table().items() if p in late}
            groups.discard(os.getpgrp())
            groups.discard(0)
            deadline = time.monotonic() + 5
            while any(_alive(p) for p in tree) and time.monotonic() < deadline:
                time.sleep(0.1)
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            for pid in tree:
                if _alive(pid):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while any(_alive(p) for p in tree) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _own_processes(self) -> set[int]:
        """Processes started for this hub: its proxy and managed services carry our
        REAPER_HUB_STATE, local single-user servers and their kernels a HOME under our homes."""
        return processes_with_env(
            exact=[f"REAPER_HUB_STATE={self.state_dir}".encode()],
            prefixes=[f"HOME={self.workdir / 'homes'}/".encode()],
        )

    def _proxy_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.state_dir / "jupyterhub-proxy.pid").read_text().strip())
        return None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> RealHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 200) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no hub log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return "(no hub log)"

    # -- REST --------------------------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            raise HubError("the hub is not started")
        return self._client

    def api(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> httpx.Response:
        """A request to the hub's REST API (directly, not through the proxy); admin token by default."""
        headers = {"Authorization": f"token {token or self.admin_token}", **kwargs.pop("headers", {})}
        return self.client.request(method, f"{self.api_url}/{path.lstrip('/')}", headers=headers, **kwargs)

    def _ok(self, r: httpx.Response, *codes: int) -> httpx.Response:
        if r.status_code not in (codes or (200,)):
            raise HubError(
                f"{r.request.method} {r.request.url} -> {r.status_code} {r.text[:500]}\n"
                f"--- hub log ---\n{self.log_tail(60)}"
            )
        return r

    def create_user(self, name: str, groups: Iterable[str] = ()) -> dict[str, Any]:
        """Create a hub user (idempotent) and add it to `groups` (created when missing)."""
        r = self.api("POST", f"users/{quote(name)}")
        if r.status_code == 409:  # exists
            r = self.api("GET", f"users/{quote(name)}")
        self._ok(r, 200, 201)
        for group in groups:
            g = self.api("POST", f"groups/{quote(group)}")
            self._ok(g, 201, 409)
            self._ok(self.api("POST", f"groups/{quote(group)}/users", json={"users": [name]}))
        return self._ok(self.api("GET", f"users/{quote(name)}")).json()

    @staticmethod
    def _server_path(user: str, name: str = "") -> str:
        return f"users/{quote(user)}/servers/{quote(name)}" if name else f"users/{quote(user)}/server"

    def user_model(self, user: str) -> dict[str, Any]:
        return self._ok(self.api("GET", f"users/{quote(user)}")).json()

    def server_model(self, user: str, name: str = "") -> dict[str, Any] | None:
        """The hub's model of the server (with `state`, as the admin sees it), None if not running."""
        servers: dict[str, Any] = self.user_model(user).get("servers", {})
        return servers.get(name)

    def start_server(
        self, user: str, name: str = "", user_options: Mapping[str, Any] | None = None, timeout: float = 90
    ) -> dict[str, Any]:
        """Start a server and wait until the hub calls it ready; returns its model."""
        # JupyterHub 5.4 takes the body as the user_options; 6.x also reads {"user_options": ...,
        # "display_name": ...} and keeps the old form when neither key is there: send the old form.
        r = self.api("POST", self._server_path(user, name), json=dict(user_options or {}))
        self._ok(r, 201, 202)
        # after 201/202 the hub lists the server as ready or pending; neither means it failed
        return self.wait_ready(user, name, timeout)

    def wait_ready(self, user: str, name: str = "", timeout: float = 90) -> dict[str, Any]:
        """Wait until the hub calls the server ready (after a spawn was asked); returns its model."""
        deadline = time.monotonic() + timeout
        while True:
            model = self.server_model(user, name)
            if model and model.get("ready"):
                return model
            if model is None or not model.get("pending"):
                raise HubError(f"server {user}/{name} failed to start\n--- hub log ---\n{self.log_tail(80)}")
            if time.monotonic() > deadline:
                raise HubError(
                    f"server {user}/{name} not ready within {timeout}s\n--- hub log ---\n{self.log_tail(80)}"
                )
            time.sleep(0.2)

    def login(self, user: str, password: str | None = None) -> httpx.Client:
        """A browser-like client logged in as `user` with the shared password (the hub's login
        form, xsrf and cookies); close it when done."""
        browser = httpx.Client(base_url=self.base_url, timeout=30)
        try:
            browser.get("/hub/login")
            xsrf = browser.cookies.get("_xsrf", path="/hub/")
            r = browser.post("/hub/login", follow_redirects=False,
                             data={"username": user, "password": password or self.password, "_xsrf": xsrf or ""})
            if r.status_code != 302:
                raise HubError(f"login of {user} -> {r.status_code} {r.text[:300]}")
        except BaseException:
            browser.close()
            raise
        return browser

    def spawn_form(self, user: str, name: str = "") -> str:
        """The spawn form the hub shows `user` (the spawner's options_form, rendered), as HTML."""
        path = f"/hub/spawn/{quote(user)}" + (f"/{quote(name)}" if name else "")
        with contextlib.closing(self.login(user)) as browser:
            r = browser.get(path, follow_redirects=False)
            if r.status_code != 200:
                raise HubError(f"GET {path} -> {r.status_code} {r.text[:300]}")
            return r.text

    def start_server_from_form(
        self, user: str, fields: Mapping[str, str | list[str]], name: str = "", timeout: float = 90
    ) -> dict[str, Any]:
        """Start a server the way a person does: log in, open the spawn form, submit `fields`
        (the form's inputs, as a browser sends them); wait until ready and return the model.
        Spawners whose options come only from their form (slurmformspawner) are driven this way."""
        path = f"/hub/spawn/{quote(user)}" + (f"/{quote(name)}" if name else "")
        with contextlib.closing(self.login(user)) as browser:
            r = browser.get(path, follow_redirects=False)
            if r.status_code != 200:
                raise HubError(f"GET {path} -> {r.status_code} {r.text[:300]}")
            xsrf = browser.cookies.get("_xsrf", path="/hub/") or ""
            data: dict[str, str | list[str]] = {"_xsrf": xsrf, **fields}
            r = browser.post(path, data=data, follow_redirects=False)
            if r.status_code not in (200, 302, 303):
                raise HubError(f"POST {path} -> {r.status_code} {r.text[:500]}\n--- hub log ---\n{self.log_tail(60)}")
            if r.status_code == 200 and self.server_model(user, name) is None:
                # the hub shows the form again with the spawner's error
                raise HubError(f"POST {path}: the form was refused: {r.text[:800]}")
        return self.wait_ready(user, name, timeout)

    def stop_server(self, user: str, name: str = "", timeout: float = 60) -> None:
        """Stop a server and wait until the hub no longer lists it."""
        r = self.api("DELETE", self._server_path(user, name))
        self._ok(r, 202, 204, 404)
        deadline = time.monotonic() + timeout
        while self.server_model(user, name) is not None:
            if time.monotonic() > deadline:
                raise HubError(f"server {user}/{name} still listed {timeout}s after DELETE")
            time.sleep(0.2)

    def hub_last_activity(self, user: str, name: str = "") -> datetime | None:
        """The hub's last_activity of the server (what the admin panel and stock culler see)."""
        model = self.server_model(user, name)
        return parse_time(model.get("last_activity")) if model else None

    def server_prefix(self, user: str, name: str = "") -> str:
        """The server's URL path: /user/NAME/ or /user/NAME/SERVER/."""
        return f"/user/{quote(user)}/{quote(name)}/" if name else f"/user/{quote(user)}/"

    def server_url(self, user: str, name: str = "") -> str:
        """The server through the proxy (what a browser uses; every request there counts as activity)."""
        return f"{self.base_url}{self.server_prefix(user, name)}"

    def server_target(self, user: str, name: str = "", token: str | None = None) -> str:
        """The server's own address from the proxy route table (GET /hub/api/proxy), e.g. http://127.0.0.1:PORT."""
        routes = self._ok(self.api("GET", "proxy", token=token)).json()
        if "items" in routes:  # paginated form
            routes = {r["routespec"]: r for r in routes["items"]}
        spec = self.server_prefix(user, name)
        route = routes.get(spec) or routes.get(spec.rstrip("/"))
        if route is None:
            raise HubError(f"no proxy route for {spec}: {sorted(routes)}")
        return str(route["target"]).rstrip("/")

    def direct_url(self, user: str, name: str = "") -> str:
        """The server's own address plus its prefix: probes here bypass the proxy."""
        return f"{self.server_target(user, name)}{self.server_prefix(user, name)}"

    # -- the single-user server --------------------------------------------------------------

    def user_api(
        self, method: str, user: str, path: str, *, name: str = "", token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        """A request to the single-user server's /api/... through the proxy (admin token by default)."""
        headers = {"Authorization": f"token {token or self.admin_token}", **kwargs.pop("headers", {})}
        url = f"{self.server_url(user, name)}api/{path.lstrip('/')}"
        return self.client.request(method, url, headers=headers, **kwargs)

    def start_kernel(self, user: str, name: str = "", kernel_name: str = "python3") -> str:
        """Create a kernel over REST; returns its id. It stays 'starting' until a client talks to it
        (open_kernel_ws does)."""
        r = self._ok(self.user_api("POST", user, "kernels", name=name, json={"name": kernel_name}), 201)
        return str(r.json()["id"])

    def kernels(self, user: str, name: str = "") -> list[dict[str, Any]]:
        """The server's kernels, read directly from its own address without counting as activity."""
        url = f"{self.direct_url(user, name)}api/kernels"
        r = self.client.get(
            url, params={"no_track_activity": "1"}, headers={"Authorization": f"token {self.admin_token}"}
        )
        return list(self._ok(r).json())

    def kernel(self, user: str, kernel_id: str, name: str = "") -> dict[str, Any]:
        for k in self.kernels(user, name):
            if k["id"] == kernel_id:
                return k
        raise HubError(f"kernel {kernel_id} not found on {user}/{name}")

    def open_kernel_ws(self, user: str, kernel_id: str, name: str = "", timeout: float = 60) -> KernelChannel:
        """Open a websocket to the kernel (through the proxy, like a browser) and wait for its
        kernel_info_reply, so the kernel is started and idle when this returns."""
        url = self.server_url(user, name).replace("http://", "ws://", 1) + f"api/kernels/{kernel_id}/channels"
        ch = KernelChannel(url, {"Authorization": f"token {self.admin_token}"}, kernel_id, timeout=timeout)
        try:
            # the kernel may still be starting: ask until it answers
            deadline = time.monotonic() + timeout
            while True:
                msg_id = ch.send("shell", "kernel_info_request", {})
                try:
                    ch.reply_to(msg_id, timeout=5)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
        except BaseException:
            ch.close()
            raise
        return ch

    def execute(self, ws: KernelChannel, code: str) -> str:
        """Send an execute_request (returns at once; the kernel is busy while `code` runs).
        Returns the msg_id: `ws.wait_idle(msg_id)` waits for the end."""
        return ws.send(
            "shell",
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
        )

    def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 30,
        interval: float = 0.2,
        what: str = "condition",
    ) -> None:
        """Poll `predicate` until true; fail with the hub's log tail after `timeout`."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise HubError(f"{what} not met within {timeout}s\n--- hub log ---\n{self.log_tail(60)}")
            time.sleep(interval)
