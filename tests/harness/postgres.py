"""A real PostgreSQL 15 for tests: a throw-away cluster on 127.0.0.1 and a free port.

``postgres_server()`` is a context manager that yields a SQLAlchemy URL
``postgresql+psycopg://postgres@127.0.0.1:PORT/reaper_test`` and stops and deletes the cluster on
exit. It uses Debian's binaries in ``/usr/lib/postgresql/15/bin`` (override with env
``REAPER_PG_BINDIR``). As root the cluster runs as the ``postgres`` user (through ``runuser``);
otherwise as the current user. ``REAPER_TEST_POSTGRES_URL`` points the tests at an existing server
instead (its database must be empty or hold only the reaper's tables).

Durability is switched off (fsync, synchronous_commit, full_page_writes): the cluster lives for one
test session and starting it takes about a second.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_BINDIR = "/usr/lib/postgresql/15/bin"
DATABASE = "reaper_test"

__all__ = ["PostgresUnavailable", "bindir", "fresh_database", "postgres_available", "postgres_server"]


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be started here (binaries missing, no postgres user, start failed)."""


def bindir() -> Path:
    return Path(os.environ.get("REAPER_PG_BINDIR", DEFAULT_BINDIR))


def _run_as() -> str | None:
    """The user that runs the cluster: ``postgres`` as root (initdb refuses root), else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError as e:
        raise PostgresUnavailable("running as root but there is no 'postgres' user to run PostgreSQL") from e
    return "postgres"


def postgres_available() -> tuple[bool, str]:
    """Whether a PostgreSQL can be had here, and if not, why."""
    if os.environ.get("REAPER_TEST_POSTGRES_URL"):
        return True, "REAPER_TEST_POSTGRES_URL"
    b = bindir()
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (b / tool).exists():
            return False, f"{b / tool} not found (apt-get install postgresql-15)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False, "no 'postgres' user"
        if shutil.which("runuser") is None:
            return False, "runuser not found"
    return True, str(b)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cmd(user: str | None, *args: str) -> list[str]:
    return ["runuser", "-u", user, "--", *args] if user else list(args)


def _check(cmd: list[str], what: str, log: Path | None = None, timeout: float = 60) -> None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PostgresUnavailable(f"{what} failed: {e}") from e
    if p.returncode != 0:
        extra = ""
        if log is not None and log.exists():
            extra = "\n--- server log ---\n" + log.read_text(errors="replace")[-4000:]
        raise PostgresUnavailable(f"{what} failed ({p.returncode}): {p.stdout}{p.stderr}{extra}")


@contextmanager
def postgres_server(database: str = DATABASE) -> Iterator[str]:
    """Start a throw-away PostgreSQL cluster; yield its SQLAlchemy URL; stop and delete it after."""
    existing = os.environ.get("REAPER_TEST_POSTGRES_URL")
    if existing:
        yield existing
        return
    ok, why = postgres_available()
    if not ok:
        raise PostgresUnavailable(why)
    user = _run_as()
    b = bindir()
    root = Path(tempfile.mkdtemp(prefix="reaper-pg-"))
    data, sock, log = root / "data", root / "sock", root / "server.log"
    sock.mkdir()
    if user is not None:
        pw = pwd.getpwnam(user)
        for p in (root, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    os.chmod(root, 0o700)
    port = _free_port()
    started = False
    try:
        _check(
            _cmd(
                user,
                str(b / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
                "--no-instructions",
            ),
            "initdb",
        )
        opts = (
            f"-h 127.0.0.1 -p {port} -k {sock} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=50 -c shared_buffers=32MB"
        )
        _check(
            _cmd(
                user,
                str(b / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                opts,
                "-l",
                str(log),
                "-w",
                "-t",
                "30",
                "start",
            ),
            "pg_ctl start",
            log,
        )
        started = True
        _create_database(port, database)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"
    finally:
        if started:
            subprocess.run(
                _cmd(user, str(b / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"),
                capture_output=True,
                timeout=60,
                cwd="/",
            )
        shutil.rmtree(root, ignore_errors=True)


def _create_database(port: int, database: str) -> None:
    import psycopg

    deadline = time.monotonic() + 20
    while True:
        try:
            with psycopg.connect(
                host="127.0.0.1",
                port=port,
                user="postgres",
                dbname="postgres",
                autocommit=True,
                connect_timeout=5,
            ) as conn:
                conn.execute(f"CREATE DATABASE \"{database}\" ENCODING 'UTF8' TEMPLATE template0")
            return
        except psycopg.OperationalError as e:
            if time.monotonic() > deadline:
                raise PostgresUnavailable(f"cannot connect to the new PostgreSQL on port {port}: {e}") from e
            time.sleep(0.1)


def fresh_database(url: str, name: str) -> str:
    """Create an empty database ``name`` on the server of ``url``; return the URL of the new database."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    with psycopg.connect(
        host=u.host or "127.0.0.1",
        port=u.port or 5432,
        user=u.username,
        password=u.password,
        dbname="postgres",
        autocommit=True,
        connect_timeout=10,
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' TEMPLATE template0")
    return u.set(database=name).render_as_string(hide_password=False)
