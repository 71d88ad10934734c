"""Session fixtures for container tests: the runner's image (podman) and a local registry."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.images import Registry, build_runner_image
from tests.helpers import require_containers

REPO = Path(__file__).resolve().parents[2]
# Kept between sessions, as uv's cache is: the Debian rootfs tarball takes a minute to make.
IMAGE_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "prefect-vm-runner"
    / "images"
)
# A cold build (mmdebstrap, then the dependencies) runs in the first test that asks for
# the image, and its fixture setup counts against that test's timeout.
IMAGE_TIMEOUT = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "runner_image" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.image)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(IMAGE_TIMEOUT))


@pytest.fixture(scope="session")
def build_image() -> Callable[[], str]:
    """Builds this checkout's image, or finds it (the same source gives the same tag)."""
    require_containers("mmdebstrap")
    return functools.partial(build_runner_image, REPO, cache_dir=IMAGE_CACHE)


@pytest.fixture(scope="session")
def runner_image(build_image: Callable[[], str]) -> str:
    """``localhost/prefect-vm-runner-test:<hash>``: this checkout's runner in a venv at
    /opt/runner (first on PATH, so ``python -m runner`` works), extras ``[s3]``."""
    return build_image()


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """An empty local registry over plain HTTP; push with ``devtools.images.push``."""
    require_containers("docker-registry", "skopeo")
    with Registry() as server:
        yield server
