"""Make a spec's environment ready: from the cache, or built with uv under the cache's lock."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runner.environment.cache import EnvCache
from runner.environment.spec import EnvSpec
from runner.environment.uv import build, env_key
from runner.settings import Settings


@dataclass(frozen=True)
class Ready:
    key: str
    python: Path
    cache_hit: bool
    seconds: float


def materialize(spec: EnvSpec, *, settings: Settings, say: Callable[[str], None]) -> Ready:
    """The environment for ``spec``, built once per key however many runners ask at once.
    The cache's shared lock on it stays held, and is inherited across the exec into it,
    so that the cache's collector never removes it while the flow runs."""
    started = time.monotonic()
    key = env_key(spec)
    cache = EnvCache(settings.workdir / "cache" / "envs", max_bytes=settings.env_cache_bytes)
    if not cache.path(key).is_dir():
        say(f"environment {key[:12]}: not in the cache; building it")
    cached = cache.get(key, lambda tmp: build(spec, tmp, settings=settings, say=say))
    os.set_inheritable(cached.lock_fd, True)
    seconds = time.monotonic() - started
    how = "cache hit, no install" if cached.cache_hit else "built"
    say(f"environment {key[:12]} ready ({how}) in {seconds:.2f}s: {cached.path}")
    return Ready(key, cached.path / "bin" / "python", cached.cache_hit, seconds)
