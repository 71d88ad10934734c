"""Run the flow stage inside a container image with podman (or docker); the guard stays on the host.

The worker execs the container CLI (same pid): the guard's signals reach the
container through the CLI's signal proxy, and the flow stage inside reports
over the worker's channel, passed in as fd 3 (podman ``--preserve-fds``).
Docker cannot pass a descriptor; there the guard learns the outcome from the
exit status and the run's state in Prefect.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runner import redaction
from runner.errors import EnvBuildError, output_tail
from runner.settings import Settings

CHANNEL_FD = 3
# Variables the flow stage needs inside: Prefect's and the runner's settings, and
# the usual cloud credentials (the flow talks to the same buckets as the host).
_FORWARDED_PREFIXES = (
    "PREFECT_", "RUNNER_", "AWS_", "GOOGLE_", "GCE_", "AZURE_", "COILED_", "DASK_", "UV_",
)  # fmt: skip
_FORWARDED_NAMES = ("STORAGE_EMULATOR_HOST", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "TZ")
_TAIL_LINES = 8


def container_cli() -> str:
    """podman if present, else docker; a clear error when there is neither."""
    for name in ("podman", "docker"):
        if found := shutil.which(name):
            return found
    raise EnvBuildError(
        "the flow run asks for a container image, but neither podman nor docker is on PATH; "
        "install one (apt-get install podman) or run without --image"
    )


@dataclass(frozen=True)
class Launch:
    """How to run the flow stage in the container."""

    argv: list[str]
    channel_fd: int | None  # where the worker's channel must be; None: it cannot pass
    cli: str
    name: str  # the container's, for removing it if the CLI is killed


def prepare(
    ref: str,
    *,
    settings: Settings,
    stage_file: Path,
    extra_env: dict[str, str],
    say: Callable[[str], None],
) -> Launch:
    """Pull ``ref`` if it is not local yet; return how to run the flow stage in it.
    ``extra_env`` holds variables the exec adds (forwarded by name like the rest)."""
    cli = container_cli()
    _pull_if_missing(cli, ref, say=say)
    podman = os.path.basename(cli) == "podman"
    workdir = str(settings.workdir)
    name = f"prefect-vm-runner-{settings.run_id()}"
    argv = [
        cli, "run", "--rm", "--init", "--pull", "never", "--network", "host",
        "--name", name,
        "--volume", f"{workdir}:{workdir}", "--workdir", str(settings.run_dir()),
    ]  # fmt: skip
    if podman:
        # --replace: a container of an earlier attempt at this run (its CLI killed) must
        # not block this one.
        argv += ["--preserve-fds", "1", "--replace"]
    argv += shlex.split(settings.container_run_args or "")
    # Names only: the CLI copies each value from its own environment, so no secret is
    # ever in an argument list.
    for variable in sorted(
        _forwarded(os.environ) | set(settings.as_environment()) | set(extra_env)
    ):
        argv += ["--env", variable]
    argv += [ref, "python3", "-m", "runner", "worker-stage", str(stage_file)]
    return Launch(argv, CHANNEL_FD if podman else None, cli, name)


def remove(cli: str, name: str) -> None:
    """Remove the container ``name`` if it is still there (its CLI was killed); quiet."""
    subprocess.run([cli, "rm", "--force", name], capture_output=True, check=False, timeout=60)


def _forwarded(environ: os._Environ[str] | dict[str, str]) -> set[str]:
    # --secret-env names are secrets the flow needs: they go in too, by name.
    secrets = set(redaction.secret_names(environ))
    return {
        name
        for name in environ
        if name.startswith(_FORWARDED_PREFIXES) or name in _FORWARDED_NAMES or name in secrets
    }


def _pull_if_missing(cli: str, ref: str, *, say: Callable[[str], None]) -> None:
    present = subprocess.run(
        [cli, "image", "inspect", "--format", "{{.Id}}", ref], capture_output=True, check=False
    )
    if present.returncode == 0:
        say(f"image {ref}: present locally, no pull")
        return
    say(f"image {ref}: pulling with {os.path.basename(cli)}")
    started = time.monotonic()
    done = subprocess.run(
        [cli, "pull", "--quiet", ref], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        tail = output_tail(done.stderr or done.stdout, _TAIL_LINES) or f"exit {done.returncode}"
        raise EnvBuildError(f"could not pull image {ref}: {tail}")
    say(f"image {ref}: pulled in {time.monotonic() - started:.1f}s")
