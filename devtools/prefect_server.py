"""A throwaway local Prefect server on a free loopback port: SQLite under a temp home, or
the PostgreSQL database it is given (devtools/postgres_server.py, for a fleet)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from devtools.server_process import ServerProcess, free_port

__all__ = ["PrefectServer", "free_port"]

REPO = Path(__file__).resolve().parent.parent


class PrefectServer(ServerProcess):
    """``with PrefectServer() as server: server.api_url``; stopped (by process group) on exit."""

    name = "prefect-server"
    health_path = "/api/health"

    def __init__(
        self,
        home: Path | None = None,
        *,
        start_timeout: float = 90.0,
        database_url: str | None = None,
        record: Path | None = None,
    ) -> None:
        super().__init__(start_timeout=start_timeout, directory=home)
        self.home = self.dir
        self.api_url = f"{self.url}/api"
        self.database_url = database_url or f"sqlite+aiosqlite:///{self.home}/prefect.db"
        # Every request served, a JSON line each (devtools/metered_server.py).
        self.record = record

    def command(self) -> list[str]:
        # The server's own Prefect may be another than its clients': `make test-compat`
        # runs the runner on the oldest supported Prefect against the newest server.
        python = os.environ.get("RUNNER_TEST_SERVER_PYTHON") or sys.executable
        if self.record is not None:
            launcher = [python, "-m", "devtools.metered_server", "--record", str(self.record)]
        else:
            launcher = [python, "-m", "prefect", "server", "start"]
        return [*launcher, "--host", "127.0.0.1", "--port", str(self.port)]

    def process_env(self) -> dict[str, str | None]:
        return {
            **self.env(),
            "PREFECT_API_URL": None,  # the server must not talk to itself as a client
            "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url,
            "PREFECT_SERVER_UI_ENABLED": "false",
            # devtools is not installed, only runner is: the metered server finds it here.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }

    def env(self) -> dict[str, str]:
        """Environment for a client of this server (a runner, a CLI, a flow)."""
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOCAL_STORAGE_PATH": str(self.home / "storage"),
        }
