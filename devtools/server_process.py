"""A local stand-in server process: free loopback port, temp dir, health wait, group stop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


S = TypeVar("S", bound="ServerProcess")


class ServerProcess:
    """A server command in its own session with its log and data in a temp dir; ready
    once its ``health_path`` answers HTTP (any status); stopped by process group."""

    name = "server"
    health_path = "/"
    stop_signal = signal.SIGTERM

    def __init__(self, *, start_timeout: float = 60.0, directory: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory or Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.log_path = self.dir / "server.log"
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def process_env(self) -> dict[str, str | None]:
        """Extra environment for the server process itself (None: remove the variable)."""
        return {}

    def env(self) -> dict[str, str]:
        """Environment for a client of this server."""
        raise NotImplementedError

    def __enter__(self: S) -> S:
        try:
            self.start()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        return self

    def start(self) -> None:
        # Appended to: a restarted server keeps the log of its earlier life.
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                env=self._server_env(),
                cwd=self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, so stop() reaches children
            )
        self._wait_healthy()

    def _server_env(self) -> dict[str, str]:
        env: dict[str, str | None] = {**os.environ, **self.process_env()}
        return {name: value for name, value in env.items() if value is not None}

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited early with code {self._proc.returncode}:\n"
                    f"{self.log_tail()}"
                )
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"{self.name} not answering on {self.url} after {self._start_timeout}s:\n"
            f"{self.log_tail()}"
        )

    @property
    def pid(self) -> int | None:
        """The server process's pid (for its CPU time), while it runs."""
        return self._proc.pid if self._proc is not None else None

    def ready(self) -> bool:
        """Whether the started process serves yet: its ``health_path`` answers HTTP."""
        try:
            httpx.get(self.url + self.health_path, timeout=2)
        except httpx.TransportError:
            return False
        return True

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return "(no log)"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, self.stop_signal)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    @contextmanager
    def down(self) -> Iterator[None]:
        """``with server.down(): ...``: the server is stopped inside the block and started
        again after it, on the same port with the same data (an outage, for a test)."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
