"""The contract every storage backend fulfils: a bucket-like place addressed by URL."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from runner.errors import StorageNotFound


@runtime_checkable
class Storage(Protocol):
    """One bucket, container or directory; keys are ``/``-separated paths inside it.

    Contract (tests/storage/test_conformance.py runs it against every backend,
    each on its real server or emulator):

    - ``size(key)`` is the object's size in bytes; it raises ``StorageNotFound``
      when the object or the bucket/container itself does not exist.
    - ``exists(key)`` is ``size`` that answers False instead of raising
      ``StorageNotFound``.
    - ``read_range(key, start, length)`` returns exactly ``length`` bytes starting at
      byte ``start``, fewer only where the object ends. It is called from several
      threads at once, so a backend's client must be thread-safe.
    - ``upload(path, key)`` stores the local file ``path`` at ``key``, replacing
      what was there; large files go up in parts where the SDK does that.
    - ``list(prefix)`` returns the sorted keys that start with ``prefix``
      (``UnsupportedUrl`` where the protocol cannot list, e.g. plain HTTPS).
    - ``url(key)`` is the URL that resolves back to this backend and ``key``.
    - Every failure is a ``runner.errors.StorageError`` (``StorageNotFound``,
      ``AccessDenied``, ``TransientStorageError`` for what is worth retrying),
      translated at the backend's boundary with ``raise ... from exc``; no SDK
      exception ever leaves a backend. Messages name the URL, never credentials.
    - SDKs are imported lazily, in the backend's constructor; a missing SDK
      raises ``MissingDependency`` with the exact ``pip install`` command.
    """

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def read_range(self, key: str, start: int, length: int) -> bytes: ...

    def upload(self, path: Path, key: str) -> None: ...

    def list(self, prefix: str) -> list[str]: ...

    def url(self, key: str) -> str: ...


class ExistsBySize:
    """``exists`` for a backend whose ``size`` raises ``StorageNotFound`` for a missing
    object, as the contract requires: one request, and no second way to get it wrong."""

    def exists(self, key: str) -> bool:
        try:
            self.size(key)  # type: ignore[attr-defined]
        except StorageNotFound:
            return False
        return True
