"""A throwaway PostgreSQL cluster (Debian's ``postgresql``) on a free loopback port, for a
Prefect server that must hold a fleet: SQLite stops answering at about 50 runs at once.

    with PostgresServer() as db, PrefectServer(database_url=db.database_url) as server: ...

Run as root, the cluster's processes run as the ``postgres`` user (PostgreSQL refuses
root), through ``setpriv`` so that the postmaster is the process this object started.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path

from devtools.server_process import HOST, ServerProcess

__all__ = ["PostgresServer", "postgres_bin"]

USER = "prefect"  # the cluster's superuser, trusted on loopback: a throwaway
DATABASE = "prefect"


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian and Ubuntu keep it off PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parts[-3]),
    )
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: `make system-deps` installs it (Debian's postgresql)"
        )
    return Path(found[-1]).parent


class PostgresServer(ServerProcess):
    """``with PostgresServer() as db: db.database_url``; the data directory is removed on exit."""

    name = "postgres"
    stop_signal = signal.SIGINT  # PostgreSQL's fast shutdown: does not wait for clients

    def __init__(self, *, start_timeout: float = 60.0, max_connections: int = 200) -> None:
        super().__init__(start_timeout=start_timeout)
        self._bin = postgres_bin()
        self._max_connections = max_connections
        self.data_dir = self.dir / "data"
        self.database_url = f"postgresql+asyncpg://{USER}@{HOST}:{self.port}/{DATABASE}"
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            shutil.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as_postgres = [
                "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
            ]  # fmt: skip

    def start(self) -> None:
        if not self.data_dir.exists():
            self._initdb()
        super().start()
        self._tool("createdb", "-h", HOST, "-p", str(self.port), "-U", USER, DATABASE)

    def _initdb(self) -> None:
        self._tool(
            "initdb", "-D", str(self.data_dir), "-U", USER, "--auth=trust", "--no-sync",
            "-E", "UTF8", "--locale=C.UTF-8",
        )  # fmt: skip

    def _tool(self, name: str, *args: str) -> None:
        done = subprocess.run(
            [*self._as_postgres, str(self._bin / name), *args],
            cwd=self.dir,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0 and "already exists" not in done.stderr:
            raise RuntimeError(f"{name} failed ({done.returncode}): {done.stderr.strip()}")

    def command(self) -> list[str]:
        return [
            *self._as_postgres, str(self._bin / "postgres"), "-D", str(self.data_dir),
            "-h", HOST, "-p", str(self.port), "-k", str(self.dir),
            "-c", f"max_connections={self._max_connections}",
        ]  # fmt: skip

    def ready(self) -> bool:
        probe = [str(self._bin / "pg_isready"), "-q", "-h", HOST, "-p", str(self.port)]
        return subprocess.run(probe, check=False).returncode == 0

    def env(self) -> dict[str, str]:
        return {"PREFECT_API_DATABASE_CONNECTION_URL": self.database_url}
