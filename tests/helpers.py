"""Small helpers the tests share."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from devtools.server_process import free_port
from tests.planted import record

REPO = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m runner ARGS`` from the repository, its output captured (and recorded for
    the secrets check)."""
    done = subprocess.run(
        [sys.executable, "-m", "runner", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    record(done.stdout, done.stderr)
    return done


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


def read_events(
    api_url: str, *, event: str, resource_id: str, at_least: int = 1, timeout: float = 30
) -> list[dict]:
    """Events the server stored for a resource (they are persisted in batches, so poll)."""
    import httpx

    body = {
        "filter": {
            "event": {"name": [event]},
            "any_resource": {"id": [resource_id]},
            "order": "ASC",
        },
        "limit": 50,
    }
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(f"{api_url}/events/filter", json=body, timeout=10)
        response.raise_for_status()
        events = response.json()["events"]
        if len(events) >= at_least or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def crafted_bundle(dest_dir: Path, *members: tuple[str, str, str]) -> Path:
    """A tar.gz named by its own sha256, with members given as (name, kind, data-or-link);
    kind is "file", "symlink", "hardlink" or "dir". For bundles `bundle push` would never make."""
    import hashlib
    import io
    import tarfile

    kinds = {
        "file": tarfile.REGTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "dir": tarfile.DIRTYPE,
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            info.type = kinds[kind]
            if kind == "file":
                data = value.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.linkname = value
                tar.addfile(info)
    data = buffer.getvalue()
    path = dest_dir / f"{hashlib.sha256(data).hexdigest()}.tar.gz"
    path.write_bytes(data)
    return path
