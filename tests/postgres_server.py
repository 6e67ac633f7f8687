"""A throwaway real PostgreSQL server for tests (the state store's backend, issue #18).

Debian's server, run as the `postgres` user in a temporary directory: its own cluster
(initdb), listening on a unix socket in that directory only (`listen_addresses=''`:
no TCP port on any interface of the machine), fsync on as in production, removed
with everything in it by `stop()`.  Needs root (for `runuser`) and the `postgresql`
package (.ci/apt-packages).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from appliance.lab import servers
from appliance.lab.topology import LabError

USER = servers.POSTGRES_USER
DATABASE = "appliance"


def bindir() -> Path | None:
    """The newest installed server's programs, if any."""
    try:
        return servers.postgres_bindir()
    except LabError:
        return None


def available() -> str | None:
    """Why a server cannot be started here, or None when it can."""
    if os.geteuid() != 0:
        return "a test PostgreSQL needs root (runuser to the postgres user)"
    if bindir() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"no {USER} user"
    return None


class PostgresServer:
    """One cluster on a unix socket in a temporary directory; `dsn` reaches its database."""

    def __init__(self) -> None:
        found = bindir()
        if found is None:
            raise RuntimeError("PostgreSQL is not installed")
        self.bin = found
        self.dir = Path(tempfile.mkdtemp(prefix="appliance-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.started = False
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _as_postgres(self, *argv: str | Path, timeout: float = 60.0) -> str:
        done = subprocess.run(
            ["runuser", "-u", USER, "--", *map(str, argv)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{argv[0]} failed ({done.returncode}): {done.stdout}{done.stderr}{self.output()}"
            )
        return done.stdout

    def _start(self) -> None:
        entry = pwd.getpwnam(USER)
        os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.dir.chmod(0o700)
        servers.postgres_init(self.data, "trust")
        options = (
            f"-k {self.dir} -c listen_addresses='' -c fsync=on -c unix_socket_permissions=0700"
        )
        self._as_postgres(
            self.bin / "pg_ctl", "start", "-D", self.data, "-l", self.log, "-w", "-t", "60",
            "-o", options,
        )  # fmt: skip
        self.started = True
        deadline = time.monotonic() + 30
        while subprocess.run(
            [self.bin / "pg_isready", "-q", "-h", self.dir], check=False
        ).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not become ready: {self.output()}")
            time.sleep(0.1)
        self.psql(f"CREATE DATABASE {DATABASE}")

    def dsn_for(self, database: str) -> str:
        return f"host={self.dir} dbname={database} user={USER}"

    @property
    def dsn(self) -> str:
        """`host=<socket dir> dbname=appliance user=postgres` (libpq's key=value form)."""
        return self.dsn_for(DATABASE)

    def psql(self, command: str, database: str = "postgres") -> str:
        """One SQL command through psql, as the superuser; its output."""
        return self._as_postgres(
            self.bin / "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.dir,
            "-d", database, "-c", command,
        )  # fmt: skip

    def output(self) -> str:
        """The server's log, for a failure's report."""
        try:
            return self.log.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (fast: open sessions are ended) and remove its directory."""
        if self.started:
            self.started = False
            subprocess.run(
                ["runuser", "-u", USER, "--", self.bin / "pg_ctl", "stop", "-D", self.data,
                 "-m", "fast", "-w", "-t", "60"],
                capture_output=True,
                check=False,
            )  # fmt: skip
        shutil.rmtree(self.dir, ignore_errors=True)
