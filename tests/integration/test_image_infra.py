"""The runner's image goes through a real registry and runs under podman."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from devtools.images import Registry, image_id, podman_run_flags, pull, push


def _podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.image
def test_image_pulled_from_registry_runs_the_runner(
    runner_image: str, registry: Registry, build_image: Callable[[], str]
):
    built = image_id(runner_image)
    reference = push(runner_image, registry, "prefect-vm-runner:test")
    removed = _podman("rmi", runner_image)
    assert removed.returncode == 0, removed.stderr
    try:
        assert image_id(runner_image) is None
        assert image_id(reference) is None

        assert pull(reference) == built

        runs = {
            python: _podman(
                "run", "--rm", *podman_run_flags(), reference, python, "-m", "runner", "--help"
            )
            for python in ("python", "python3")
        }
    finally:
        # Later tests in this session use the fixture's tag: put it back.
        if image_id(reference) is not None:
            _podman("tag", reference, runner_image)
            _podman("rmi", reference)
        if image_id(runner_image) is None:
            build_image()

    for python, run in runs.items():
        assert run.returncode == 0, f"{python}: {run.stderr}"
        assert "--flow-run-id" in run.stdout, python
