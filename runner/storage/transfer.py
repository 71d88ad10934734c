"""Download one object to a local file: concurrent ranged reads, sha256 computed in order
as parts land, retries with backoff on transient errors, progress callbacks."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from runner.errors import TransientStorageError
from runner.retry import Backoff, retry
from runner.storage import redact
from runner.storage.base import Storage

log = logging.getLogger("runner")

MiB = 1024 * 1024
T = TypeVar("T")

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class TransferConfig:
    """How a download is split: parts of ``part_size`` bytes, ``concurrency`` in flight."""

    part_size: int = 16 * MiB
    concurrency: int = 8
    retries: int = 5
    backoff_seconds: float = 0.5


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str
    seconds: float


def download(
    storage: Storage,
    key: str,
    dest: Path,
    *,
    config: TransferConfig = TransferConfig(),
    progress: Progress | None = None,
) -> Downloaded:
    """Write the object at ``key`` to ``dest`` and return its size and sha256.

    Parts are fetched ``config.concurrency`` at a time but written and hashed
    strictly in order, so memory stays bounded (concurrency x part size) and
    the digest is ready the moment the last byte lands: no second pass."""
    started = time.monotonic()
    name = redact(storage.url(key))  # for messages: no signature or credentials
    size = _with_retries(lambda: storage.size(key), config, what=f"size of {name}")
    hasher = hashlib.sha256()
    done = 0
    starts = deque(range(0, size, config.part_size))
    with open(dest, "wb") as out, ThreadPoolExecutor(config.concurrency) as pool:
        in_flight: deque[Future[bytes]] = deque()

        def submit_next() -> None:
            start = starts.popleft()
            length = min(config.part_size, size - start)
            in_flight.append(pool.submit(_read_part, storage, key, name, start, length, config))

        while starts and len(in_flight) < config.concurrency:
            submit_next()
        while in_flight:
            data = in_flight.popleft().result()
            if starts:
                submit_next()
            hasher.update(data)
            out.write(data)
            done += len(data)
            if progress:
                progress(done, size)
        # On disk before the caller renames it into a cache that trusts what it holds.
        out.flush()
        os.fsync(out.fileno())
    return Downloaded(dest, size, hasher.hexdigest(), time.monotonic() - started)


def _read_part(
    storage: Storage, key: str, name: str, start: int, length: int, config: TransferConfig
) -> bytes:
    def read() -> bytes:
        data = storage.read_range(key, start, length)
        if len(data) != length:  # a dropped connection can look like a short body
            raise TransientStorageError(
                f"short read of {name} at byte {start}: got {len(data)} of {length} bytes"
            )
        return data

    return _with_retries(read, config, what=f"bytes {start}-{start + length - 1} of {name}")


def _with_retries(call: Callable[[], T], config: TransferConfig, *, what: str) -> T:
    def say(exc: Exception, retries: int, delay: float) -> None:
        log.warning(
            "transient error reading %s (%s); retry %d of %d in %.1fs",
            what,
            exc,
            retries,
            config.retries,
            delay,
        )

    return retry(
        call,
        on=TransientStorageError,
        backoff=Backoff(first=config.backoff_seconds),
        attempts=config.retries + 1,
        before_retry=say,
    )
