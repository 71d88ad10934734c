"""Deployment steps for prefect.yaml: ``runner.steps.push_bundle`` and ``runner.steps.pull_bundle``.

    push:
      - runner.steps.push_bundle:
          id: bundle
          path: .
          to: s3://my-bucket/flows
    pull:
      - runner.steps.pull_bundle:
          url: "{{ bundle.url }}"

Settings (cache location, limits) come from the ``RUNNER_*`` environment, as
for the runner itself.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from runner.bundle import build
from runner.code import pull
from runner.settings import load_settings
from runner.storage import join, redact, resolve
from runner.units import human_bytes, human_rate

log = logging.getLogger("runner")


def push_bundle(to: str, path: str = ".") -> dict[str, str]:
    """Build the bundle of ``path`` and upload it under ``to`` unless already there;
    returns ``{"url": ..., "sha256": ...}`` for templating later steps."""
    resolve(join(to, "probe"))  # a bad URL or a missing SDK fails before any packing
    with tempfile.TemporaryDirectory(prefix="runner-bundle-") as tmp:
        log.info("packing %s", Path(path).resolve())
        started = time.monotonic()
        built = build(Path(path), Path(tmp))
        log.info(
            "packed %d files into %s in %.1fs (sha256 %s)",
            built.files,
            human_bytes(built.size),
            time.monotonic() - started,
            built.sha256[:12],
        )
        url = join(to, built.path.name)
        storage, key = resolve(url)
        if storage.exists(key):
            log.info("bundle %s already at %s; not uploading", built.sha256[:12], redact(url))
        else:
            started = time.monotonic()
            storage.upload(built.path, key)
            seconds = time.monotonic() - started
            log.info(
                "uploaded %s to %s in %.1fs (%s)",
                human_bytes(built.size),
                redact(url),
                seconds,
                human_rate(built.size, seconds),
            )
    return {"url": url, "sha256": built.sha256}


def pull_bundle(url: str, directory: str | None = None) -> dict[str, str]:
    """Fetch and extract the bundle at ``url`` into ``directory`` (default: a new
    ``code`` directory under the current one); returns ``{"directory": ...}``, which
    Prefect's step runner makes the working directory."""
    dest = Path(directory or Path.cwd() / "code").resolve()
    pull(url, dest, settings=load_settings(), say=log.info)
    return {"directory": os.fspath(dest)}
