"""The runner's container image (images/docker/Dockerfile): built with podman from this
checkout, it runs a flow run whose code comes from a bucket, as a work pool would start it.

The Dockerfile's default base (python:3.11-slim) is on Docker Hub, which these machines
cannot reach: the test builds it over a local Debian base instead, the rootfs that
devtools.images makes with mmdebstrap plus python3-venv and this host's CA bundle.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from devtools.images import (
    HOST_CA_BUNDLE,
    _digest,
    _locked,
    _rootfs_image,
    _run,
    image_id,
    podman_run_flags,
)
from tests.conftest import FLOWS_DIR, REPO
from tests.helpers import require_containers, run_cli
from tests.planted import record

pytestmark = [pytest.mark.image, pytest.mark.timeout(1200)]

# Shared with tests/integration (the rootfs tarball takes a minute to make).
IMAGE_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "prefect-vm-runner"
    / "images"
)
BASE_REPO = "localhost/prefect-vm-runner-pybase"
IMAGE = "localhost/prefect-vm-runner:test"
USER_ID = "10001"  # the Dockerfile's `runner` user
STEP = "runner.steps.pull_bundle"

# What python:3.11-slim gives the Dockerfile: python3 with its venv module (and pip).
BASE_CONTAINERFILE = """\
FROM {rootfs}
RUN apt-get -o Acquire::Check-Valid-Until=false -o Acquire::Check-Date=false update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
      python3-venv >/dev/null \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
{ca}
"""
# PyPI may only be reachable through a proxy that a CA added on this host signs for.
CA_LINES = """\
COPY ca.crt /etc/ssl/certs/ca-certificates.crt
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt
"""


def _base_image() -> str:
    """Debian bookworm's python3 and python3-venv, tagged by what it is made from."""
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    with _locked(IMAGE_CACHE / "build.lock"):
        rootfs = _rootfs_image(IMAGE_CACHE)
        ca = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.is_file() else b""
        containerfile = BASE_CONTAINERFILE.format(rootfs=rootfs, ca=CA_LINES if ca else "")
        tag = f"{BASE_REPO}:{_digest({'containerfile': containerfile, 'ca': ca.hex()})}"
        if image_id(tag) is None:
            with tempfile.TemporaryDirectory(dir=IMAGE_CACHE, prefix="build-pybase-") as tmp:
                (Path(tmp) / "Containerfile").write_text(containerfile)
                if ca:
                    (Path(tmp) / "ca.crt").write_bytes(ca)
                _run("podman", "build", "--quiet", "--pull=never", *podman_run_flags(),
                     "--tag", tag, tmp)  # fmt: skip
    return tag


@pytest.fixture(scope="session")
def container_image() -> str:
    """The image, built the documented way over the local base; podman's layer cache makes
    a second build (same source) take seconds. Returns its id, so that a concurrent build
    retagging IMAGE cannot swap it."""
    require_containers("mmdebstrap")
    base = _base_image()
    with tempfile.TemporaryDirectory() as tmp:
        iidfile = Path(tmp) / "iid"
        started = time.monotonic()
        _run("podman", "build", "--quiet", *podman_run_flags(),
             "--file", str(REPO / "images/docker/Dockerfile"), "--build-arg", f"BASE={base}",
             "--iidfile", str(iidfile), "--tag", IMAGE, str(REPO))  # fmt: skip
        print(f"built {IMAGE} in {time.monotonic() - started:.1f}s")
        return iidfile.read_text().strip()


def _podman_run(
    image: str,
    *args: str,
    env: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """``podman run --rm`` with this machine's flags; variables go by name only (their
    values from this process's environment, never in an argument list)."""
    name = f"pvr-container-test-{os.getpid()}-{time.monotonic_ns()}"
    argv = ["podman", "run", "--rm", "--name", name, *podman_run_flags()]
    for variable in sorted(env or {}):
        argv += ["--env", variable]
    try:
        done = subprocess.run(
            [*argv, *flags, image, *args],
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:  # a timeout leaves the container running
        subprocess.run(["podman", "rm", "--force", name], capture_output=True, check=False)
    record(done.stdout, done.stderr)
    return done


def test_the_entrypoint_takes_runner_flags_or_a_whole_command(container_image):
    as_flags = _podman_run(container_image, "--version")
    # What a Docker, ECS or Kubernetes work pool runs with `command: python -m runner`: its
    # command replaces CMD, so it comes to the ENTRYPOINT as arguments.
    as_command = _podman_run(container_image, "python", "-m", "runner", "--version")
    who = _podman_run(container_image, "id", "-u")

    assert as_flags.returncode == 0, as_flags.stderr
    assert as_flags.stdout.startswith("prefect-vm-runner ")
    assert as_command.returncode == 0 and as_command.stdout == as_flags.stdout
    assert who.stdout.strip() == USER_ID


def test_a_flow_run_runs_through_the_image(
    container_image, prefect_server, moto, flow_run, client, tmp_path
):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    pushed = run_cli("bundle", "push", str(FLOWS_DIR), "--to", f"s3://conformance/image-{tmp_path.name[-8:]}",
                     env={**os.environ, **prefect_server.env(), **moto.env()})  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    run = flow_run("hello", n=21, path=None, pull_steps=[{STEP: {"url": pushed.stdout.strip()}}])
    # The flow's result goes to a directory of the test's, at the same path in the container,
    # where the runner's (non-root) user may write.
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o777)

    started = time.monotonic()
    done = _podman_run(
        container_image,
        "--flow-run-id",
        str(run.id),
        env={
            **moto.env(),
            "PREFECT_API_URL": prefect_server.api_url,
            "PREFECT_LOCAL_STORAGE_PATH": str(results),
        },
        flags=("--volume", f"{results}:{results}"),
    )
    print(f"flow run through the image in {time.monotonic() - started:.1f}s")

    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"claimed flow run {run.id}" in output
    assert "hello from the worker, n=21" in output
    state = client.read_flow_run(run.id).state
    assert state.is_completed(), state
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(results)}):
        assert state.result() == 42
    # Written by the image's user, not root.
    assert {str(path.stat().st_uid) for path in results.iterdir()} == {USER_ID}
