"""Reach (or start) the real database servers the tests need, make throwaway databases and clusters.

Nothing here skips: a server that cannot be reached, even after trying to start it, fails the test with a
message saying what was tried. The servers default to the CI machine's (PostgreSQL on 127.0.0.1:5432 as
`postgres` with trust auth, MariaDB on 127.0.0.1:3306 as `root`); override with TUNER_TEST_POSTGRES and
TUNER_TEST_MYSQL (admin URLs).
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.engine import URL, make_url

POSTGRES_ADMIN = os.environ.get("TUNER_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MYSQL_ADMIN = os.environ.get("TUNER_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")
START_WAIT_S = 30


def _error(url: str | URL) -> str | None:
    """None if a connection works, else the driver's first line."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        return None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        return str(getattr(exc, "orig", exc)).strip().splitlines()[0]
    finally:
        engine.dispose()


def _start_postgres() -> list[str]:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions:
        return ["no cluster under /etc/postgresql"]
    cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"]
    return [" ".join(cmd), _run_quietly(cmd)]


def _start_mariadb() -> list[str]:
    cmd = ["start-stop-daemon", "--start", "--oknodo", "--background", "--exec", "/usr/sbin/mariadbd"]
    return [" ".join(cmd), _run_quietly(cmd)]


def _run_quietly(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"failed: {exc}"
    return f"exit {done.returncode} {done.stderr.strip()[:300]}"


def _ensure(url: str, name: str, start) -> str:
    first = _error(url)
    if first is None:
        return url
    tried = start()
    deadline = time.monotonic() + START_WAIT_S
    error = first
    while time.monotonic() < deadline:
        error = _error(url)
        if error is None:
            return url
        time.sleep(1)
    pytest.fail(
        f"{name} is not reachable at {make_url(url).render_as_string(hide_password=True)} ({first}); "
        f"tried to start it: {'; '.join(tried)}; still failing after {START_WAIT_S}s: {error}",
        pytrace=False,
    )


def ensure_postgres() -> str:
    """The admin URL of a running PostgreSQL server, started if need be."""
    return _ensure(POSTGRES_ADMIN, "PostgreSQL", _start_postgres)


def ensure_mariadb() -> str:
    """The admin URL of a running MariaDB/MySQL server, started if need be."""
    return _ensure(MYSQL_ADMIN, "MariaDB", _start_mariadb)


def ensure(kind: str) -> str:
    return ensure_postgres() if kind == "postgresql" else ensure_mariadb()


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new empty database on the admin URL's server (its URL), dropped afterwards."""
    name = f"tuner_test_{secrets.token_hex(4)}"
    admin = make_url(admin_url)
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    postgres = admin.get_backend_name() == "postgresql"
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            force = " WITH (FORCE)" if postgres else ""
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}{force}"))
        engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[::-1]), None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} not found on PATH or under /usr/lib/postgresql/*/bin", pytrace=False)
    return found


class ThrowawayPostgres:
    """A PostgreSQL cluster of our own in a temp dir, on a free port, with password (scram) auth, that a test
    may stop and restart at will. User `tuner` (password `password`) owns database `tuner`."""

    user = "tuner"
    database = "tuner"

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tuner-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.password = "pw-" + secrets.token_hex(8)
        self.admin_password = "admin-" + secrets.token_hex(8)
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.admin_password + "\n")
        if self._as_postgres:
            shutil.chown(pwfile, "postgres", "postgres")
        self._pg(
            "initdb", "-D", str(self.data), "-U", "postgres", f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync",
        )  # fmt: skip
        pwfile.unlink()
        self.start()
        admin = sqlalchemy.create_engine(
            self.url("postgres", self.admin_password, "postgres"), isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'"))
            conn.execute(sqlalchemy.text(f"CREATE DATABASE {self.database} OWNER {self.user}"))
        admin.dispose()

    def _pg(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*self._as_postgres, _pg_bin(tool), *args], capture_output=True, text=True, timeout=120, cwd=self.root
        )
        if check and done.returncode != 0:
            pytest.fail(f"{tool} {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}", pytrace=False)
        return done

    def url(self, user: str | None = None, password: str | None = None, database: str | None = None) -> str:
        """A URL with the password in it (or none, if `password` is "")."""
        pw = self.password if password is None else password
        auth = f"{user or self.user}" + (f":{pw}" if pw else "")
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{database or self.database}"

    @property
    def running(self) -> bool:
        return self._pg("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def start(self) -> None:
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} -c fsync=off"
        )
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        if self.running:
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)
