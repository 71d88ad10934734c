"""The environment cache: one build per key across concurrent callers, partial builds
removed, least recently used envs collected past the size limit, never one in use."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from runner.environment.cache import EnvCache


def _builder(calls: list[str], size: int = 1000, delay: float = 0.0):
    def build(directory: Path) -> None:
        calls.append(directory.name)
        directory.mkdir()
        time.sleep(delay)
        (directory / "blob").write_bytes(b"x" * size)

    return build


def _keys(root: Path) -> list[str]:
    return sorted(p.name[:1] for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_concurrent_callers_build_a_key_once(tmp_path):
    cache = EnvCache(tmp_path, max_bytes=10**9)
    calls: list[str] = []
    results = []

    def ask() -> None:
        results.append(cache.get("k" * 64, _builder(calls, delay=0.3)))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(calls) == 1
    assert sorted(r.cache_hit for r in results) == [False, True, True, True]
    assert {r.path for r in results} == {tmp_path / ("k" * 64)}
    for r in results:
        os.close(r.lock_fd)


def test_a_failed_build_leaves_nothing_and_the_next_caller_builds(tmp_path):
    cache = EnvCache(tmp_path, max_bytes=10**9)

    def broken(directory: Path) -> None:
        directory.mkdir()
        (directory / "half").write_text("x")
        raise RuntimeError("uv failed")

    with pytest.raises(RuntimeError):
        cache.get("k" * 64, broken)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith((".use", ".build"))] == []

    calls: list[str] = []
    again = cache.get("k" * 64, _builder(calls))
    assert not again.cache_hit and calls
    os.close(again.lock_fd)


def test_a_dead_runners_partial_build_is_removed(tmp_path):
    cache = EnvCache(tmp_path, max_bytes=10**9)
    stale = tmp_path / f".{'k' * 64}.99999.partial"
    stale.mkdir()

    cached = cache.get("k" * 64, _builder([]))

    assert not stale.exists()
    os.close(cached.lock_fd)


def test_least_recently_used_envs_go_first_and_one_in_use_stays(tmp_path):
    cache = EnvCache(tmp_path, max_bytes=3500)  # room for three ~1 kB envs
    in_use = cache.get("a" * 64, _builder([]))  # oldest, but held
    for key in "bc":
        os.close(cache.get(key * 64, _builder([])).lock_fd)
        time.sleep(0.01)
    assert _keys(tmp_path) == ["a", "b", "c"]

    os.close(cache.get("d" * 64, _builder([])).lock_fd)  # over: the oldest free one goes

    assert _keys(tmp_path) == ["a", "c", "d"]
    os.close(in_use.lock_fd)
