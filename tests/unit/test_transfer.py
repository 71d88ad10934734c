"""The ranged downloader: order, digest, retries and progress, over an in-memory backend."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path

import pytest

from runner.errors import StorageNotFound, TransientStorageError
from runner.storage.transfer import TransferConfig, download

FAST = TransferConfig(part_size=1000, concurrency=4, retries=3, backoff_seconds=0.001)


class MemoryStorage:
    """A Storage over a dict; parts answer in random order, some fail or come back short."""

    def __init__(self, objects: dict[str, bytes], *, flaky: int = 0, short: int = 0) -> None:
        self.objects = objects
        self.flaky = flaky
        self.short = short
        self.reads: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def size(self, key: str) -> int:
        if key not in self.objects:
            raise StorageNotFound(f"mem://{key} does not exist")
        return len(self.objects[key])

    def exists(self, key: str) -> bool:
        return key in self.objects

    def read_range(self, key: str, start: int, length: int) -> bytes:
        time.sleep(random.random() / 500)  # parts finish out of order
        with self._lock:
            self.reads.append((start, length))
            if self.flaky:
                self.flaky -= 1
                raise TransientStorageError("503 slow down")
            if self.short:
                self.short -= 1
                return self.objects[key][start : start + length // 2]
        return self.objects[key][start : start + length]

    def upload(self, path: Path, key: str) -> None:
        self.objects[key] = path.read_bytes()

    def list(self, prefix: str) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))

    def url(self, key: str) -> str:
        return f"mem://{key}"


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 25_500])
def test_download_writes_the_object_and_its_digest(tmp_path, size):
    data = os.urandom(size)
    storage = MemoryStorage({"k": data})
    seen: list[int] = []
    result = download(
        storage, "k", tmp_path / "out", config=FAST, progress=lambda done, total: seen.append(done)
    )
    assert (tmp_path / "out").read_bytes() == data
    assert result.sha256 == hashlib.sha256(data).hexdigest() and result.size == size
    assert seen == sorted(seen) and (not seen or seen[-1] == size)
    assert len(storage.reads) == -(-size // FAST.part_size)


def test_transient_errors_and_short_reads_are_retried(tmp_path):
    data = os.urandom(10_000)
    storage = MemoryStorage({"k": data}, flaky=2, short=1)
    result = download(storage, "k", tmp_path / "out", config=FAST)
    assert result.sha256 == hashlib.sha256(data).hexdigest()


def test_persistent_transient_errors_give_up(tmp_path):
    storage = MemoryStorage({"k": b"x" * 5000}, flaky=100)
    with pytest.raises(TransientStorageError):
        download(storage, "k", tmp_path / "out", config=FAST)


def test_missing_object_is_not_retried(tmp_path):
    storage = MemoryStorage({})
    with pytest.raises(StorageNotFound):
        download(storage, "nope", tmp_path / "out", config=FAST)
    assert storage.reads == []
