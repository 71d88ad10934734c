"""Small helpers the tests share."""

from __future__ import annotations

import os
import time
from pathlib import Path

from devtools.prefect_server import free_port


def wait_for_file(path: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (text := path.read_text().strip()):
            return text
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout}s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def unused_api_url() -> str:
    return f"http://127.0.0.1:{free_port()}/api"

