"""Deployment steps for prefect.yaml: ``runner.steps.push_bundle``, ``push_senv`` and
``pull_bundle``.

    push:
      - runner.steps.push_bundle:
          id: bundle
          path: .
          to: s3://my-bucket/flows
          capture: true            # optional: the current environment, as senv.json
    pull:
      - runner.steps.pull_bundle:
          url: "{{ bundle.url }}"

Settings (cache location, limits) come from the ``RUNNER_*`` environment, as
for the runner itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

from runner.bundle import build
from runner.code import pull
from runner.errors import ConfigError
from runner.settings import load_settings
from runner.storage import join, redact, resolve
from runner.units import human_bytes, human_rate

log = logging.getLogger("runner")

# A captured environment in a bundle; found by runner.environment.spec.find_in.
SENV_IN_BUNDLE = "senv.json"


def push_bundle(to: str, path: str = ".", capture: bool = False) -> dict[str, str]:
    """Build the bundle of ``path`` and upload it under ``to`` unless already there;
    returns ``{"url": ..., "sha256": ...}`` for templating later steps. With
    ``capture``, the current Python environment goes into the bundle as ``senv.json``,
    which the runner installs before running the flow (like Coiled's package sync)."""
    resolve(join(to, "probe"))  # a bad URL or a missing SDK fails before any packing
    extra = {SENV_IN_BUNDLE: _captured()} if capture else None
    with tempfile.TemporaryDirectory(prefix="runner-bundle-") as tmp:
        log.info("packing %s", Path(path).resolve())
        started = time.monotonic()
        built = build(Path(path), Path(tmp), extra=extra)
        log.info(
            "packed %d files into %s in %.1fs (sha256 %s)",
            built.files,
            human_bytes(built.size),
            time.monotonic() - started,
            built.sha256[:12],
        )
        url = _upload_once(built.path, join(to, built.path.name), built.sha256)
    return {"url": url, "sha256": built.sha256}


def push_senv(to: str, spec: str | None = None, capture: bool = False) -> dict[str, str]:
    """Upload an environment spec (a file, or with ``capture`` the current environment)
    under ``to`` as ``<sha256>.json``, for ``--senv-url`` or the ``senv`` job variable;
    returns ``{"url": ..., "sha256": ...}``."""
    from runner.environment.spec import load, to_bytes

    if (spec is None) == (not capture):
        raise ConfigError("give a spec file or --capture (not both)")
    resolve(join(to, "probe"))
    data = _captured() if capture else to_bytes(load(Path(spec)))  # type: ignore[arg-type]
    sha256 = hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory(prefix="runner-senv-") as tmp:
        local = Path(tmp) / f"{sha256}.json"
        local.write_bytes(data)
        url = _upload_once(local, join(to, local.name), sha256)
    return {"url": url, "sha256": sha256}


def _captured() -> bytes:
    from runner.environment.capture import capture
    from runner.environment.spec import to_bytes

    spec = capture()
    for note in spec.notes:
        log.info("%s", note)
    return to_bytes(spec)


def _upload_once(local: Path, url: str, sha256: str) -> str:
    """Upload ``local`` to ``url`` unless it is there already (content-addressed)."""
    storage, key = resolve(url)
    if storage.exists(key):
        log.info("%s already at %s; not uploading", sha256[:12], redact(url))
        return url
    size = local.stat().st_size
    started = time.monotonic()
    storage.upload(local, key)
    seconds = time.monotonic() - started
    log.info(
        "uploaded %s to %s in %.1fs (%s)",
        human_bytes(size),
        redact(url),
        seconds,
        human_rate(size, seconds),
    )
    return url


def pull_bundle(url: str, directory: str | None = None) -> dict[str, str]:
    """Fetch and extract the bundle at ``url`` into ``directory`` (default: a new
    ``code`` directory under the current one); returns ``{"directory": ...}``, which
    Prefect's step runner makes the working directory."""
    dest = Path(directory or Path.cwd() / "code").resolve()
    pull(url, dest, settings=load_settings(), say=log.info)
    return {"directory": os.fspath(dest)}
