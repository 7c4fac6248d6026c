"""A throwaway PostgreSQL cluster for tests: Debian's server binaries, no systemd.

    with PostgresCluster() as pg:          # one per test module or session
        url = pg.create_database("t1")     # a fresh database per test

The cluster's initdb (the slow part, ~4 s) is cached as a template directory under
/var/cache/gitops-agent-tests and copied for each cluster; it is rebuilt when missing.
The server runs as the `postgres` system user (PostgreSQL refuses root), listens on a free
port of 127.0.0.1 only, with fsync off, and is stopped by its own pg_ctl.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from tests.support.service import TestService

CACHE = Path(os.environ.get("GITOPS_AGENT_TEST_CACHE", "/var/cache/gitops-agent-tests"))
SUPERUSER = "agent"


def server_bin() -> Path | None:
    """The newest installed PostgreSQL server's bin directory, or None."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster(TestService):
    """A PostgreSQL server on 127.0.0.1 in a temporary directory."""

    def __init__(self) -> None:
        found = server_bin()
        if found is None:
            raise RuntimeError("no PostgreSQL server installed (apt-get install postgresql)")
        self.bin = found
        self.port = 0
        self._options = ""
        self._dir: Path | None = None
        self._user = pwd.getpwnam("postgres")

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(
            argv,
            check=True,
            capture_output=True,
            user=self._user.pw_uid,
            group=self._user.pw_gid,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
        )

    def _template(self) -> Path:
        """The cached result of initdb, made once per PostgreSQL version."""
        template = CACHE / f"pg-{self.bin.parent.name}-initdb"
        if not (template / "PG_VERSION").exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            building = Path(tempfile.mkdtemp(prefix="pg-initdb-", dir=CACHE))
            os.chown(building, self._user.pw_uid, self._user.pw_gid)
            self._as_postgres(
                str(self.bin / "initdb"), "-D", str(building / "data"), "-A", "trust",
                "-U", SUPERUSER, "-E", "UTF8",
            )  # fmt: skip
            with contextlib.suppress(OSError):
                (building / "data").rename(template)
            shutil.rmtree(building, ignore_errors=True)
        return template

    @property
    def data(self) -> Path:
        assert self._dir is not None
        return self._dir / "data"

    def start(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="pg-cluster-"))
        os.chmod(self._dir, 0o755)
        shutil.copytree(self._template(), self.data, symlinks=True)
        for path in [self.data, *self.data.rglob("*")]:
            os.lchown(path, self._user.pw_uid, self._user.pw_gid)
        os.chmod(self.data, 0o700)
        self.port = _free_port()
        options = (
            f"-p {self.port} -k {self._dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c full_page_writes=off -c synchronous_commit=off"
        )
        os.chown(self._dir, self._user.pw_uid, self._user.pw_gid)
        self._options = options
        self.resume()

    def pause(self) -> None:
        """Stop the server as an operator's restart does (`pg_ctl stop -m fast`: every
        session is ended), keeping its data and port for `resume`."""
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")

    def resume(self) -> None:
        """Start the server (again), on the same port; returns once it accepts connections."""
        assert self._dir is not None
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", self._options,
            "-l", str(self._dir / "server.log"), "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self) -> None:
        if self._dir is None:
            return
        with contextlib.suppress(subprocess.CalledProcessError):
            self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def create_database(self, name: str) -> str:
        """A new empty database; its connection URL."""
        command = ["psql", self.url(), "-v", "ON_ERROR_STOP=1", "-qc", f'CREATE DATABASE "{name}"']
        subprocess.run(command, check=True, capture_output=True)
        return self.url(name)
