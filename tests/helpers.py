"""Small helpers the tests share."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from devtools.server_process import free_port
from tests.planted import record

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"


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


def assert_one_error_line(done: subprocess.CompletedProcess[str], code: int, says: str) -> str:
    """A command (not a run: no teardown) ended with ``code``, and its stderr is one error
    line, no traceback or SDK chatter, that says ``says``; returns the line."""
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and " ERROR " in lines[0] and says in lines[0], done.stderr
    return lines[0]


def require_containers(*tools: str) -> None:
    """Skip the test, with one line saying why, unless podman (and ``tools``) are installed
    and podman can really start a container here; in CI (``CI=true``) fail instead, so
    the container tests never go missing there."""
    import pytest

    from devtools.images import podman_cannot_start

    missing = [tool for tool in ("podman", "runc", *tools) if shutil.which(tool) is None]
    if missing:
        why = f"{', '.join(missing)} not installed (devtools/system-deps.sh installs them)"
    else:
        why = podman_cannot_start()
    if why is None:
        return
    if IN_CI:
        pytest.fail(f"{why}; CI must run the container tests")
    pytest.skip(why)


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


def nvml_gpu_count() -> int:
    """How many GPUs NVML itself sees on this machine (0 without a driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no device
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def assert_gpus_match_nvml(gpus: list[dict]) -> None:
    """One entry per GPU that NVML finds, each a real device; none without a driver."""
    assert [gpu["index"] for gpu in gpus] == list(range(nvml_gpu_count()))
    for gpu in gpus:
        assert set(gpu) == {
            "index", "utilization_percent", "memory_used_bytes", "memory_total_bytes"
        }  # fmt: skip
        assert gpu["memory_total_bytes"] > 0
        assert 0 <= gpu["memory_used_bytes"] <= gpu["memory_total_bytes"]
        assert 0 <= gpu["utilization_percent"] <= 100


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


def compression_bomb(dest_dir: Path, *, members: int, member_bytes: int, pax: bool = False) -> Path:
    """A real tar.gz compression bomb named by its own sha256: ``members`` files of
    ``member_bytes`` zeros each (or, with ``pax``, one pax header claiming all those bytes,
    which tarfile would read whole into memory), a few MB on disk. Built from one
    compressed block of zeros repeated as concatenated gzip members, so it takes
    milliseconds to make whatever it expands to."""
    import gzip
    import hashlib
    import tarfile

    assert member_bytes % 512 == 0  # no padding between members
    zeros = gzip.compress(b"\0" * member_bytes, compresslevel=9)

    def header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.type = size, kind
        return gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT))

    path = dest_dir / "bomb.partial"
    digest = hashlib.sha256()
    with path.open("wb") as out:

        def write(chunk: bytes) -> None:
            out.write(chunk)
            digest.update(chunk)

        if pax:
            write(header("././@PaxHeader", members * member_bytes, tarfile.XHDTYPE))
        for index in range(members):
            if not pax:
                write(header(f"blob-{index:04d}", member_bytes))
            write(zeros)
        write(gzip.compress(b"\0" * 1024))  # the end-of-archive blocks
    return path.rename(dest_dir / f"{digest.hexdigest()}.tar.gz")
