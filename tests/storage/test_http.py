"""HTTP specifics: statuses a server answers, signatures kept out of messages, servers
that ignore Range, no listing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devtools.server_process import free_port
from devtools.storage_servers import HttpFileServer
from runner.errors import (
    AccessDenied,
    StorageError,
    StorageNotFound,
    TransientStorageError,
    UnsupportedUrl,
)
from runner.storage import resolve

SIGNATURE = "X-Amz-Signature=0123456789abcdef&X-Amz-Credential=AKIAEXAMPLE"


@pytest.fixture
def object_url(http: HttpFileServer) -> str:
    (http.root / "o").mkdir(exist_ok=True)
    (http.root / "o" / "bundle.tar.gz").write_bytes(bytes(range(256)) * 40)
    return f"{http.url}/o/bundle.tar.gz?{SIGNATURE}"


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, AccessDenied),
        (403, AccessDenied),
        (404, StorageNotFound),
        (410, StorageNotFound),
        (429, TransientStorageError),
        (500, TransientStorageError),
        (503, TransientStorageError),
        (400, StorageError),
    ],
)
def test_status_becomes_the_matching_error(
    http: HttpFileServer, object_url: str, status: int, error: type[StorageError], tmp_path: Path
) -> None:
    storage, key = resolve(object_url)
    source = tmp_path / "x"
    source.write_bytes(b"x")
    http.fail(status)
    for call in (
        lambda: storage.size(key),
        lambda: storage.read_range(key, 0, 10),
        lambda: storage.upload(source, key),
    ):
        with pytest.raises(error) as caught:
            call()
        assert type(caught.value) is error
        assert f"HTTP {status}" in str(caught.value)


def test_messages_never_show_the_signature(http: HttpFileServer, object_url: str) -> None:
    storage, key = resolve(object_url.replace("bundle", "absent"))
    with pytest.raises(StorageNotFound) as caught:
        storage.size(key)
    message = str(caught.value)
    assert f"{http.url}/o/absent.tar.gz" in message
    assert "Signature" not in message and "AKIA" not in message


def test_the_query_is_sent_with_every_request(
    http: HttpFileServer, object_url: str, tmp_path: Path
) -> None:
    storage, key = resolve(object_url)
    assert key == object_url
    storage.read_range(key, 0, 1)
    source = tmp_path / "x"
    source.write_bytes(b"x")
    storage.upload(source, key)
    assert all(path.endswith(SIGNATURE) for _, path, _ in http.requests[-2:])


def test_size_uses_a_ranged_get_not_head(http: HttpFileServer, object_url: str) -> None:
    """Presigned URLs are signed for one method; a GET URL refuses HEAD."""
    storage, key = resolve(object_url)
    http.requests.clear()
    assert storage.size(key) == 10_240
    assert http.requests == [("GET", object_url.removeprefix(http.url), "bytes=0-0")]


def test_server_that_ignores_range(http: HttpFileServer, object_url: str) -> None:
    data = bytes(range(256)) * 40
    storage, key = resolve(object_url)
    http.ranges = False
    assert storage.size(key) == len(data)
    assert storage.read_range(key, 1000, 300) == data[1000:1300]
    assert storage.read_range(key, 10_000, 1000) == data[10_000:]
    assert storage.read_range(key, 20_000, 10) == b""


def test_unreachable_server_is_transient() -> None:
    storage, key = resolve(f"http://127.0.0.1:{free_port()}/x?{SIGNATURE}")
    with pytest.raises(TransientStorageError) as caught:
        storage.read_range(key, 0, 10)
    assert "Signature" not in str(caught.value)


def test_listing_is_unsupported(object_url: str) -> None:
    storage, _ = resolve(object_url)
    with pytest.raises(UnsupportedUrl, match="no listing"):
        storage.list(object_url.rpartition("/")[0] + "/")


def test_transient_fault_clears(http: HttpFileServer, object_url: str) -> None:
    """One 503 and then the object: what the caller's retry relies on."""
    storage, key = resolve(object_url)
    http.fail(503, times=1)
    with pytest.raises(TransientStorageError):
        storage.read_range(key, 0, 10)
    assert storage.read_range(key, 0, 4) == bytes(range(4))


def test_upload_is_a_put_of_the_file(http: HttpFileServer, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    source = tmp_path / "x"
    source.write_bytes(data)
    storage, key = resolve(f"{http.url}/up/new/x.bin?sig=1")
    storage.upload(source, key)
    assert (http.root / "up" / "new" / "x.bin").read_bytes() == data
    assert http.requests[-1][0] == "PUT"
