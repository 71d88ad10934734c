"""Built environments by key under <workdir>/cache/envs: built once, atomically, LRU-collected."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("runner")

_LAST_USED = ".last-used"
_SIZE = ".size"


@dataclass(frozen=True)
class CachedEnv:
    path: Path
    cache_hit: bool
    # Its use lock, held shared (flock) for as long as the env is used, inherited across exec:
    # the collector never removes an environment a live process runs in.
    lock_fd: int


class EnvCache:
    """Environments keyed by the sha256 of what they were built from (Ray's runtime_env
    model): a key is built once under an exclusive file lock, in a temporary directory
    that is renamed into place when complete; partial builds of dead runners are removed."""

    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str, build: Callable[[Path], None]) -> CachedEnv:
        """The environment for ``key``, built by ``build(tmp_dir)`` if it is not there.

        Two locks per key: ``.build`` (exclusive, while one caller builds) and ``.use``
        (shared by every process running in the env, tried exclusively by the
        collector). One lock for both would make a second caller wait for the first
        one's whole flow run instead of just its build."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(key)
        use = self._use_lock(key)
        try:
            hit = self._hold_if_present(final, use)
            if not hit:
                with self._locked(f".{key}.build", fcntl.LOCK_EX):
                    hit = self._hold_if_present(final, use)  # built while we waited
                    if not hit:
                        # Held before the env exists: the collector can never take it
                        # between its rename into place and our first use.
                        fcntl.flock(use, fcntl.LOCK_SH)
                        self._build(key, final, build)
        except BaseException:
            os.close(use)
            raise
        if not hit:
            self.collect(keep=key)
        return CachedEnv(final, hit, use)

    def _use_lock(self, key: str) -> int:
        return os.open(self.root / f".{key}.use", os.O_RDWR | os.O_CREAT, 0o644)

    @staticmethod
    def _hold_if_present(final: Path, use: int) -> bool:
        if not final.is_dir():
            return False
        fcntl.flock(use, fcntl.LOCK_SH)
        if final.is_dir():  # not collected between the check and the lock
            _touch(final)
            return True
        fcntl.flock(use, fcntl.LOCK_UN)
        return False

    @contextlib.contextmanager
    def _locked(self, name: str, operation: int) -> Iterator[None]:
        fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)

    def _build(self, key: str, final: Path, build: Callable[[Path], None]) -> None:
        # Under the exclusive lock, any partial build of this key is a dead runner's.
        for stale in self.root.glob(f".{key}.*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".{key}.{os.getpid()}.partial"
        try:
            build(tmp)
            (tmp / _SIZE).write_text(str(_tree_size(tmp)))
            _touch(tmp)  # never the oldest entry when it appears
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def collect(self, *, keep: str | None = None) -> list[str]:
        """Remove least recently used environments until the cache fits ``max_bytes``;
        one in use (its lock held by a live process) is never removed. Best effort: a
        failure is logged, never raised (the caller's env is ready). Returns the keys
        removed."""
        try:
            return self._collect(keep)
        except OSError as exc:
            log.warning("environment cache: collection stopped: %s", exc)
            return []

    def _collect(self, keep: str | None) -> list[str]:
        for trash in self.root.glob(".*.trash"):  # a collector that died mid-delete
            shutil.rmtree(trash, ignore_errors=True)
        entries = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            entries.append((_last_used(path), _recorded_size(path), path.name))
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, key in sorted(entries):  # oldest first
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            trash = self.root / f".{key}.{os.getpid()}.trash"
            with self._exclusive_now(key) as free:
                if not free or not self.path(key).is_dir():  # in use, or another collector's
                    continue
                os.rename(self.path(key), trash)  # gone at once for readers
            shutil.rmtree(trash, ignore_errors=True)  # slow part, outside the lock
            total -= size
            removed.append(key)
            log.info(
                "environment cache: removed %s (%d bytes) to stay under %d",
                key[:12],
                size,
                self.max_bytes,
            )
        return removed

    @contextlib.contextmanager
    def _exclusive_now(self, key: str) -> Iterator[bool]:
        fd = self._use_lock(key)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)


def _touch(path: Path) -> None:
    (path / _LAST_USED).touch()


def _last_used(path: Path) -> float:
    try:
        return (path / _LAST_USED).stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _recorded_size(path: Path) -> int:
    try:
        return int((path / _SIZE).read_text())
    except (FileNotFoundError, ValueError):
        return _tree_size(path)


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
