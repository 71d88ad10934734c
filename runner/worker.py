"""The worker (child process): claim the flow run, place its code and environment, run the flow.

Two stages, so that Prefect is imported once, in the interpreter that runs the
flow. The bootstrap (claim, code, environment) needs only httpx and the
runner's own modules. Then the worker either runs the flow stage in this
process, or ``execve``s (same pid, so the guard keeps watching it) into the
flow's environment (``<env>/bin/python -m runner worker-stage FILE``) or into a
container (``podman run ... python -m runner worker-stage FILE``), which runs
the flow stage there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from runner import __version__, code, logs
from runner.channel import Claimed, Container, Phase, Sender
from runner.errors import BootstrapError, CodeLoadError, EnvBuildError
from runner.prefect_rest import RunApi, RunLog, prefect_environment, run_resources
from runner.settings import Settings
from runner.stage import Stage, reporting
from runner.stage import run as run_flow_stage

log = logging.getLogger("runner")

STAGE_FILE = "stage.json"


def run(settings: Settings, flow_run_id: uuid.UUID, channel: Sender) -> int:
    """Execute the flow run and return the worker's exit code; never raises (unless it
    execs into the flow's environment, and then never returns).

    Everything the guard needs to know is also sent over ``channel``: ``claimed``
    once the run is ours, ``finished`` with the final state, or ``error``."""
    # Until the flow stage, the guard's stop signals are an exception: a uv build or an
    # image pull in progress is then killed with us (subprocess.run kills its child on
    # any exception) instead of writing on into a directory the next runner removes.
    signal.signal(signal.SIGTERM, _stopped)
    signal.signal(signal.SIGUSR1, _stopped)  # the guard's cancel; the stage takes it over
    signal.signal(signal.SIGUSR2, _stopped)  # preempted or past --max-runtime: the same
    return reporting(channel, lambda: _stoppable(settings, flow_run_id, channel))


class _Stopped(BaseException):
    """Raised by the stop signals' handler. Not an Exception, so that no ``except
    Exception`` on the way (a best-effort log write to Prefect) can swallow it."""


def _stopped(signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one is not caught
    why = {signal.SIGUSR1: "cancelled", signal.SIGUSR2: "stopped by the guard"}.get(
        signum, f"stopped by {signal.Signals(signum).name}"
    )
    raise _Stopped(
        f"{why} while preparing the flow run (claim, code, environment); the flow did not start"
    )


def _stoppable(settings: Settings, flow_run_id: uuid.UUID, channel: Sender) -> int:
    try:
        return _bootstrap(settings, flow_run_id, channel)
    except _Stopped as stop:
        raise BootstrapError(str(stop)) from None


_STOPS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}


@contextlib.contextmanager
def _stops_held() -> Iterator[None]:
    """Hold the guard's stop signals across the claim: a stop between the server's accepting
    the claim and the guard's hearing of it would leave the run Pending, claimed, for
    good. Held, it comes right after, and the guard then ends the run it knows is ours."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _bootstrap(settings: Settings, flow_run_id: uuid.UUID, channel: Sender) -> int:
    started = time.monotonic()
    with RunApi(flow_run_id, api_wait=settings.api_wait) as api:
        run_log = RunLog(api)
        try:
            with _stops_held():
                flow_run = api.claim()
                resource, related = run_resources(flow_run)
                run_count = int(flow_run.get("run_count") or 0)
                channel.send(Claimed(resource=resource, related=related, run_count=run_count))
            run_log.info(
                "prefect-vm-runner %s claimed flow run %s on %s (worker pid %d) in %.2fs",
                __version__,
                flow_run_id,
                socket.gethostname(),
                os.getpid(),
                time.monotonic() - started,
            )
            if not flow_run.get("deployment_id"):
                raise CodeLoadError(
                    f"flow run {flow_run_id} has no deployment, so there is no code to load; "
                    "create it from a deployment"
                )
            deployment = api.read_deployment(flow_run["deployment_id"])
            run_dir = settings.run_dir()
            run_dir.mkdir(parents=True, exist_ok=True)
            os.chdir(run_dir)
            code_dir = None
            if url := code.bundle_url(settings, flow_run, deployment):
                run_log.flush()  # what happened so far is visible while the code downloads
                pulled = code.pull(url, run_dir / "code", settings=settings, say=run_log.info)
                code_dir = pulled.directory
                details = {
                    "seconds": round(pulled.seconds, 3),
                    "cache_hit": pulled.fetched.cache_hit,
                    "bytes_downloaded": pulled.fetched.bytes_downloaded,
                }
                channel.send(Phase("code-pulled", details))
            stage = Stage(
                flow_run=flow_run,
                deployment=deployment,
                code_dir=str(code_dir) if code_dir else None,
                pull_steps=[
                    s for s in deployment.get("pull_steps") or [] if not code.is_pull_bundle_step(s)
                ],
                run_dir=str(run_dir),
                log_level=settings.log_level,
                log_file=str(path) if (path := logs.captured()) else None,
                channel_fd=channel.fd,
                api_wait=settings.api_wait,
            )
            switch = _environment(settings, flow_run, code_dir, stage, run_log, channel)
        finally:
            run_log.flush()
    if switch is not None:
        switch()  # execs: never returns
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the engine handles it from here
    return run_flow_stage(stage, channel)


def _environment(
    settings: Settings,
    flow_run: dict[str, Any],
    code_dir: Path | None,
    stage: Stage,
    run_log: RunLog,
    channel: Sender,
) -> Callable[[], NoReturn] | None:
    """How to get into the flow's environment: an exec into a container or a built env,
    or None to run the flow stage right here, in the runner's own environment."""
    from runner.environment import image
    from runner.environment.source import find_spec, image_ref

    started = time.monotonic()
    if ref := image_ref(settings, flow_run, say=run_log.info):
        run_log.flush()  # a pull can take a while
        api_env = prefect_environment()  # a profile's URL and key, which podman forwards
        launch = image.prepare(
            ref,
            settings=settings,
            stage_file=_stage_file(settings),
            extra_env=api_env,
            say=run_log.info,
        )
        channel.send(Container(cli=launch.cli, name=launch.name))
        seconds = round(time.monotonic() - started, 3)
        details = {"environment": "image", "image": ref, "seconds": seconds}
        channel.send(Phase("env-ready", details))
        return lambda: _exec(
            launch.argv, stage, settings, channel_to=launch.channel_fd, env=api_env
        )
    spec = find_spec(settings, flow_run, code_dir, say=run_log.info)
    if spec is None:
        channel.send(Phase("env-ready", {"environment": "runner", "seconds": 0.0}))
        return None
    from runner.environment.materialize import materialize

    run_log.flush()  # a cold build can take a while: show what is happening
    ready = materialize(spec, settings=settings, say=run_log.info)
    details = {
        "environment": spec.kind,
        "seconds": round(ready.seconds, 3),
        "cache_hit": ready.cache_hit,
    }
    channel.send(Phase("env-ready", details))
    argv = [str(ready.python), "-m", "runner", "worker-stage", str(_stage_file(settings))]
    env_root = str(ready.python.parent.parent)
    # As an activated venv: the env's console scripts and `python` come first for the
    # flow's subprocesses too.
    activated = {"VIRTUAL_ENV": env_root, "PATH": f"{env_root}/bin:{os.environ.get('PATH', '')}"}
    return lambda: _exec(argv, stage, settings, channel_to=stage.channel_fd, env=activated)


def _stage_file(settings: Settings) -> Path:
    return settings.run_dir() / STAGE_FILE


def _exec(
    argv: list[str],
    stage: Stage,
    settings: Settings,
    *,
    channel_to: int | None,
    env: dict[str, str],
) -> NoReturn:
    """Replace this process (same pid: the guard's pidfd and signals still reach it) with
    the flow stage in another interpreter, its channel on fd ``channel_to`` (None: it
    has none). Settings travel in the environment, never in the arguments, where every
    user could read them (ps)."""
    channel_fd = -1
    if channel_to is not None:
        if channel_to != stage.channel_fd:
            os.dup2(stage.channel_fd, channel_to)  # a container gets fds from 3 up
        os.set_inheritable(channel_to, True)
        channel_fd = channel_to
    replace(stage, channel_fd=channel_fd).write(_stage_file(settings))
    log.info("worker pid %d: exec %s", os.getpid(), " ".join(argv[:3]) + " ...")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(argv[0], argv, {**os.environ, **settings.as_environment(), **env})
    except OSError as exc:
        raise EnvBuildError(f"could not start the flow stage ({argv[0]}): {exc}") from exc
