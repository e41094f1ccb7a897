"""A real jupyter_server (the one JupyterLab users run) started as a subprocess on 127.0.0.1 with a token
and the companion extension, plus the real JupyterHub fixtures of tests/integration.

    server.get("api/reaper/activity")           # httpx.Response, with the server's token
    name = server.new_terminal(); server.type(name, "python3 -c '...'")
    kid = server.new_kernel(); ch = server.kernel_channel(kid); server.run(ch, "x = 1")
Every process a test starts is found through the marker in its environment and killed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websocket

from tests.harness.hub import KernelChannel, free_ports, processes_with_env
from tests.integration.conftest import hub_factory, pytest_runtest_makereport, real_hub  # noqa: F401

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]

# A loop that prints nothing and uses a little CPU (a few % of a core), as a training script writing a log would.
LOOP = "exec('import time\\nwhile True:\\n    sum(range(20000)); time.sleep(0.01)')"
SECRET = "SECRET-d41d8cd98f00b204e9800998ecf8427e"


class Server:
    def __init__(self, workdir: Path, *, companion: bool = True) -> None:
        self.workdir = workdir
        self.port = free_ports(1)[0]
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.tag = f"REAPER_TEST_SERVER={secrets.token_hex(8)}"  # finds everything it started, at the end
        self.companion = companion
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(timeout=30, headers={"Authorization": f"token {self.token}"})

    def start(self) -> Server:
        root = self.workdir / "root"
        root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY_", "REAPER_"))}
        key, value = self.tag.split("=", 1)
        env.update({
            "HOME": str(self.workdir), "JUPYTER_CONFIG_DIR": str(self.workdir / "config"),
            "JUPYTER_RUNTIME_DIR": str(self.workdir / "runtime"), "JUPYTER_DATA_DIR": str(self.workdir / "data"),
            "PYTHONPATH": str(REPO), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "SHELL": "/bin/bash",
            key: value,
        })
        args = [
            sys.executable, "-m", "jupyter_server", "--no-browser", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={root}",
            f"--ServerApp.jpserver_extensions=reaper.singleuser={self.companion}",
        ]
        if os.geteuid() == 0:
            args.append("--allow-root")
        self.log = open(self.workdir / "server.log", "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(args, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter_server exited {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.get("api/status", params={"no_track_activity": "1"}).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"jupyter_server did not answer within 60 s:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        for pid in processes_with_env(exact=[self.tag.encode()]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.client.close()
        self.log.close()

    # -- REST ----------------------------------------------------------------------------------
    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(self.url + path, **kwargs)

    def activity(self, **params: str) -> dict[str, Any]:
        r = self.get("api/reaper/activity", params=params)
        assert r.status_code == 200, r.text
        return r.json()

    # -- terminals -----------------------------------------------------------------------------
    def new_terminal(self) -> str:
        r = self.client.post(self.url + "api/terminals")
        assert r.status_code == 200, r.text
        name = str(r.json()["name"])
        self.wait_for(lambda: self.terminal(name)["pid"] is not None, what=f"terminal {name}'s shell")
        return name

    def terminal(self, name: str) -> dict[str, Any]:
        (t,) = [t for t in self.activity()["terminals"] if t["name"] == name]
        return t

    def type(self, name: str, line: str) -> None:
        """Type a line into the terminal (a websocket, as the browser's; closed again: the tab is closed)."""
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/terminals/websocket/{name}",
                                         header=[f"Authorization: token {self.token}"], timeout=30)
        try:
            ws.send(json.dumps(["stdin", line + "\r"]))
            time.sleep(0.5)  # let the shell read the line before the socket closes
        finally:
            ws.close()

    def delete_terminal(self, name: str) -> None:
        r = self.client.delete(self.url + f"api/terminals/{name}")
        assert r.status_code == 204, r.text

    # -- kernels -------------------------------------------------------------------------------
    def new_kernel(self) -> str:
        r = self.client.post(self.url + "api/kernels", json={"name": "python3"})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def kernel_channel(self, kid: str) -> KernelChannel:
        ch = KernelChannel(f"ws://127.0.0.1:{self.port}/api/kernels/{kid}/channels",
                           {"Authorization": f"token {self.token}"}, kid, timeout=60)
        deadline = time.monotonic() + 60
        while True:
            msg_id = ch.send("shell", "kernel_info_request", {})
            try:
                ch.reply_to(msg_id, timeout=5)
                return ch
            except TimeoutError:
                if time.monotonic() > deadline:
                    ch.close()
                    raise

    def run(self, ch: KernelChannel, code: str) -> dict[str, Any]:
        """Execute `code` and wait until the kernel is idle again; returns the execute_reply."""
        msg_id = ch.send("shell", "execute_request", {"code": code, "silent": False, "store_history": False,
                                                       "user_expressions": {}, "allow_stdin": False,
                                                       "stop_on_error": True})
        reply = ch.reply_to(msg_id, timeout=60)
        ch.wait_idle(msg_id)
        assert reply["content"]["status"] == "ok", reply["content"]
        return reply

    def delete_kernel(self, kid: str) -> None:
        r = self.client.delete(self.url + f"api/kernels/{kid}")
        assert r.status_code == 204, r.text

    @staticmethod
    def wait_for(predicate: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not met within {timeout} s")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("jupyter-server")).start()
    try:
        yield s
    finally:
        s.stop()
