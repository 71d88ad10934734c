"""The Storage contract (runner/storage/base.py), run against every backend on its real
server: local files, an HTTP file server, moto (S3), the GCS emulator, Azurite (az:// and
abfs://)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from runner.errors import StorageNotFound
from runner.storage import Storage, resolve
from tests.storage.conftest import MISSING, Backend

MiB = 1024 * 1024


def put(backend: Backend, tmp_path: Path, name: str, data: bytes) -> tuple[Storage, str]:
    """Upload ``data`` as ``name`` under the backend's base; returns (storage, key)."""
    source = tmp_path / f"source-{len(data)}-{os.urandom(4).hex()}"
    source.write_bytes(data)
    storage, key = resolve(backend.url(name))
    storage.upload(source, key)
    return storage, key


def test_backend_is_a_storage(backend: Backend) -> None:
    storage, _ = resolve(backend.url("x"))
    assert isinstance(storage, Storage)


def test_upload_then_size_exists_and_read(backend: Backend, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    storage, key = put(backend, tmp_path, "dir/object.bin", data)

    assert storage.size(key) == len(data)
    assert storage.exists(key)
    assert storage.read_range(key, 0, len(data)) == data
    assert storage.read_range(key, 12_345, 1000) == data[12_345:13_345]
    assert storage.read_range(key, 7, 0) == b""


def test_upload_replaces_what_was_there(backend: Backend, tmp_path: Path) -> None:
    put(backend, tmp_path, "object.bin", b"first version, longer than the second")
    storage, key = put(backend, tmp_path, "object.bin", b"second")

    assert storage.size(key) == 6
    assert storage.read_range(key, 0, 100) == b"second"


def test_empty_object(backend: Backend, tmp_path: Path) -> None:
    storage, key = put(backend, tmp_path, "empty", b"")

    assert storage.size(key) == 0
    assert storage.exists(key)
    assert storage.read_range(key, 0, 10) == b""


def test_ranged_reads_stop_at_the_end(backend: Backend, tmp_path: Path) -> None:
    data = os.urandom(10_000)
    storage, key = put(backend, tmp_path, "object.bin", data)

    assert storage.read_range(key, 9_990, 1000) == data[9_990:]  # the last, partial part
    assert storage.read_range(key, 9_999, 1) == data[-1:]
    assert storage.read_range(key, 10_000, 10) == b""  # starts at the end: nothing left


def test_large_upload_round_trips(backend: Backend, tmp_path: Path) -> None:
    """Past the SDKs' multipart / resumable thresholds (8 MiB for boto3 and GCS)."""
    data = os.urandom(9 * MiB + 123)
    storage, key = put(backend, tmp_path, "large.bin", data)

    assert storage.size(key) == len(data)
    assert storage.read_range(key, 8 * MiB - 10, MiB) == data[8 * MiB - 10 : 9 * MiB - 10]
    assert storage.read_range(key, 9 * MiB, MiB) == data[9 * MiB :]


def test_missing_object(backend: Backend, tmp_path: Path) -> None:
    put(backend, tmp_path, "present", b"x")  # the bucket and the prefix exist
    storage, key = resolve(backend.url("absent.tar.gz"))

    assert not storage.exists(key)
    with pytest.raises(StorageNotFound, match="absent.tar.gz"):
        storage.size(key)
    with pytest.raises(StorageNotFound, match="absent.tar.gz"):
        storage.read_range(key, 0, 10)


def test_missing_bucket(backend: Backend, tmp_path: Path) -> None:
    storage, key = resolve(f"{backend.missing_base}/some/key.tar.gz")

    assert not storage.exists(key)
    with pytest.raises(StorageNotFound) as caught:
        storage.size(key)
    with pytest.raises(StorageNotFound):
        storage.read_range(key, 0, 10)
    if not backend.has_buckets:
        return  # a directory or URL path that is not there: just a missing object
    assert MISSING in str(caught.value)  # the message says which bucket
    with pytest.raises(StorageNotFound):
        storage.list("some/")
    source = tmp_path / "source"
    source.write_bytes(b"data")
    with pytest.raises(StorageNotFound):
        storage.upload(source, key)


def test_list_is_sorted_and_filtered_by_prefix(backend: Backend, tmp_path: Path) -> None:
    if not backend.can_list:
        pytest.skip(f"{backend.name} cannot list (UnsupportedUrl; see its own tests)")
    for name in ["p/b", "p/a", "p/c/d", "p-x", "q/x"]:
        storage, key = put(backend, tmp_path, name, name.encode())
    base = key[: -len("q/x")]  # the key prefix of backend.base inside the bucket

    assert storage.list(base + "p/") == [base + "p/a", base + "p/b", base + "p/c/d"]
    assert storage.list(base + "p") == [base + "p-x", base + "p/a", base + "p/b", base + "p/c/d"]
    assert storage.list(base + "p/c/") == [base + "p/c/d"]
    assert storage.list(base + "nothing/") == []


def test_url_round_trips_through_resolve(backend: Backend, tmp_path: Path) -> None:
    storage, key = put(backend, tmp_path, "dir/object.bin", b"round trip")

    again, same_key = resolve(storage.url(key))
    assert type(again) is type(storage)
    assert same_key == key
    assert again.url(same_key) == storage.url(key)
    assert again.read_range(same_key, 0, 100) == b"round trip"


def test_concurrent_ranged_reads(backend: Backend, tmp_path: Path) -> None:
    """Eight threads on one backend instance, as the downloader uses it."""
    data = os.urandom(2 * MiB)
    storage, key = put(backend, tmp_path, "object.bin", data)
    part = 64 * 1024
    starts = list(range(0, len(data), part))

    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(lambda start: storage.read_range(key, start, part), starts))

    assert b"".join(parts) == data
