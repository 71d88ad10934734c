"""Place a flow run's code bundle in the workdir: find its URL, fetch it through the
cache (download, verify), and extract it safely."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.bundle import SUFFIX, BundleCache, Limits, extract, parse_url, throttled
from runner.settings import Settings
from runner.storage import redact, resolve
from runner.storage.transfer import download
from runner.units import human_bytes, human_rate

log = logging.getLogger("runner")

PULL_STEP = "runner.steps.pull_bundle"
JOB_VARIABLE = "code_url"


@dataclass(frozen=True)
class Fetched:
    archive: Path  # the verified archive in the cache
    sha256: str
    cache_hit: bool
    bytes_downloaded: int


@dataclass(frozen=True)
class Pulled:
    """What one pull did, for logs and the run summary."""

    directory: Path
    fetched: Fetched
    seconds: float


def bundle_url(
    settings: Settings, flow_run: dict[str, Any], deployment: dict[str, Any] | None
) -> str | None:
    """Where the run's code is: --code-url, else the ``code_url`` job variable, else the
    deployment's ``runner.steps.pull_bundle`` step; None when the run has no bundle.
    The run and deployment are the API's JSON (the worker reads them before Prefect
    is imported)."""
    if settings.code_url:
        return settings.code_url
    if url := (flow_run.get("job_variables") or {}).get(JOB_VARIABLE):
        return str(url)
    for step in (deployment or {}).get("pull_steps") or []:
        if is_pull_bundle_step(step):
            return str(step[PULL_STEP]["url"])
    return None


def is_pull_bundle_step(step: dict[str, Any]) -> bool:
    return PULL_STEP in step


def fetch(
    url: str,
    *,
    settings: Settings,
    say: Callable[[str], None],
    what: str = "bundle",
    suffix: str = SUFFIX,
) -> Fetched:
    """Make sure the content-addressed object at ``url`` (a bundle, or with ``what`` and
    ``suffix`` an environment spec) is in the cache, verified; download it if not."""
    ref = parse_url(url, suffix=suffix, what=what)
    cache = BundleCache(settings.workdir / "cache" / f"{what}s", suffix=suffix, what=what)
    downloaded = 0

    def report(done: int, total: int, elapsed: float) -> None:
        say(
            f"downloading {what}: {human_bytes(done)} of {human_bytes(total)} "
            f"({100 * done / max(total, 1):.0f}%) at {human_rate(done, elapsed)}"
        )

    def download_to(tmp: Path) -> str:
        nonlocal downloaded
        # Resolved only on a miss: a cache hit must not pay for an SDK client.
        storage, key = resolve(ref.url)
        result = download(storage, key, tmp, progress=throttled(report))
        downloaded = result.size
        say(
            f"{what} {ref.sha256[:12]}: downloaded {human_bytes(result.size)} from "
            f"{redact(ref.url)} in {result.seconds:.2f}s "
            f"({human_rate(result.size, result.seconds)}), sha256 verified"
        )
        return result.sha256

    archive, hit = cache.fetch(ref, download_to)
    if hit:
        say(f"{what} {ref.sha256[:12]}: cache hit ({archive}), no download")
    return Fetched(archive, ref.sha256, hit, downloaded)


def pull(url: str, dest: Path, *, settings: Settings, say: Callable[[str], None]) -> Pulled:
    """Fetch the bundle at ``url`` (or take it from the cache) and extract it to ``dest``."""
    started = time.monotonic()
    fetched = fetch(url, settings=settings, say=say)
    limits = Limits(max_bytes=settings.max_bundle_bytes, max_files=settings.max_bundle_files)
    extracted = extract(fetched.archive, dest, limits=limits)
    seconds = time.monotonic() - started
    say(f"bundle extracted into {dest}: {human_bytes(extracted)}; code ready in {seconds:.2f}s")
    return Pulled(dest, fetched, seconds)
