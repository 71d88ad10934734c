"""Real storage servers for the session, and ``backend``: one bucket-like place per backend
that the conformance suite runs against."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.storage_servers import (
    AZURITE_ACCOUNT,
    Azurite,
    GcsEmulator,
    HttpFileServer,
    MotoServer,
)
from tests.conftest import BUCKET  # the one bucket/container each server gets

MISSING = "no-such-bucket"


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    with GcsEmulator() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    with Azurite() as server:
        server.create_container(BUCKET)
        yield server


@pytest.fixture(scope="session")
def http_server() -> Iterator[HttpFileServer]:
    with HttpFileServer() as server:
        yield server


@pytest.fixture
def http(http_server: HttpFileServer) -> Iterator[HttpFileServer]:
    """The session's HTTP server, with no faults left behind by the test."""
    http_server.heal()
    yield http_server
    http_server.heal()


@pytest.fixture
def s3_env(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    use_env(monkeypatch, moto.env())
    return moto


@pytest.fixture
def gcs_env(gcs_emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> GcsEmulator:
    use_env(monkeypatch, gcs_emulator.env())
    return gcs_emulator


@pytest.fixture
def azure_env(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> Azurite:
    use_env(monkeypatch, azurite.env())
    return azurite


# Variables through which a developer's own cloud set-up could leak into a test.
_CLOUD_ENV = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_ACCOUNT_NAME",
)


def use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in _CLOUD_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@dataclass(frozen=True)
class Backend:
    """Where one backend's conformance run writes: ``base`` is a fresh prefix in a
    bucket that exists, ``missing_base`` the same in one that does not."""

    name: str
    base: str
    missing_base: str
    has_buckets: bool  # listing or writing into missing_base fails (not so for directories)
    can_list: bool = True

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


BACKENDS = ["local", "http", "s3", "gcs", "azure", "abfs"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each backend on its real server; servers start only for the backends selected."""
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    name = request.param
    if name == "local":
        return Backend(name, str(tmp_path / "store" / prefix), str(tmp_path / MISSING), False)
    if name == "http":
        http: HttpFileServer = request.getfixturevalue("http")
        return Backend(
            name, f"{http.url}/{BUCKET}/{prefix}", f"{http.url}/{MISSING}", False, can_list=False
        )
    if name == "s3":
        request.getfixturevalue("s3_env")
        return Backend(name, f"s3://{BUCKET}/{prefix}", f"s3://{MISSING}", True)
    if name == "gcs":
        request.getfixturevalue("gcs_env")
        return Backend(name, f"gs://{BUCKET}/{prefix}", f"gs://{MISSING}", True)
    request.getfixturevalue("azure_env")
    if name == "azure":
        return Backend(name, f"az://{BUCKET}/{prefix}", f"az://{MISSING}", True)
    host = f"{AZURITE_ACCOUNT}.dfs.core.windows.net"
    return Backend(name, f"abfs://{BUCKET}@{host}/{prefix}", f"abfss://{MISSING}@{host}", True)
