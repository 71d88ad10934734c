"""Where a flow run's software environment comes from: --senv-url or --image, the run's
job variables, or a lock file in its code bundle."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.environment.spec import EnvSpec, find_in, from_bytes
from runner.errors import ConfigError
from runner.settings import Settings

SPEC_SUFFIX = ".json"
# `senv` is the runner's own job variable; `software` is also what Coiled push pools
# call a Coiled software environment, which Coiled (not the runner) installs.
SENV_VARIABLES = ("senv", "software")
IMAGE_VARIABLE = "image"


def image_ref(
    settings: Settings, flow_run: dict[str, Any], *, say: Callable[[str], None]
) -> str | None:
    """The container image to run in: --image, else the run's ``image`` job variable.

    Docker, Kubernetes, ECS, Cloud Run and ACI pools also use ``image``, for the
    container they start the runner in, which has no podman or docker: there the
    variable is taken as that container's and the flow runs in place. --image is
    explicit, and without podman or docker it is an error."""
    if settings.image:
        return settings.image
    value = (flow_run.get("job_variables") or {}).get(IMAGE_VARIABLE)
    if not value:
        return None
    if not (shutil.which("podman") or shutil.which("docker")):
        say(
            f"job variable image={value!r}: no podman or docker here, so it is taken to be "
            "the container this runner runs in; running the flow in place"
        )
        return None
    return str(value)


def find_spec(
    settings: Settings,
    flow_run: dict[str, Any],
    code_dir: Path | None,
    *,
    say: Callable[[str], None],
) -> EnvSpec | None:
    """The run's environment spec: --senv-url, else the ``senv``/``software`` job
    variable (a URL as `env push` prints it, or the spec itself as an object), else a
    lock file in the code bundle; None when the runner's own environment will do."""
    if settings.senv_url:
        return fetch_spec(settings.senv_url, settings=settings, say=say)
    variables = flow_run.get("job_variables") or {}
    for name in SENV_VARIABLES:
        value = variables.get(name)
        if not value:
            continue
        if isinstance(value, dict):
            say(f"environment spec from the {name!r} job variable")
            return from_bytes(f"{name}.json", json.dumps(value).encode())
        if _is_url(str(value)):
            return fetch_spec(str(value), settings=settings, say=say)
        if name == "senv":
            raise ConfigError(
                f"job variable senv={value!r} is neither a spec URL (as `python -m runner env "
                "push` prints it) nor a spec object"
            )
        say(
            f"job variable software={value!r} names a Coiled software environment, which "
            "Coiled installs on the VM; the runner adds none"
        )
    if code_dir is not None and (spec := find_in(code_dir)) is not None:
        say(f"environment spec from the code bundle ({spec.kind})")
        return spec
    return None


def fetch_spec(url: str, *, settings: Settings, say: Callable[[str], None]) -> EnvSpec:
    from runner.code import fetch

    fetched = fetch(url, settings=settings, say=say, what="senv", suffix=SPEC_SUFFIX)
    return from_bytes(fetched.archive.name, fetched.archive.read_bytes())


def _is_url(value: str) -> bool:
    return "://" in value or "#sha256=" in value or value.startswith("/")
