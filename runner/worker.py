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

import gc
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from runner import __version__, code
from runner.bootstrap_api import BootstrapApi, RunLog, run_resources
from runner.channel import Sender
from runner.errors import CodeLoadError, ExitCode, RunnerError, exit_code_for_state
from runner.settings import Settings

log = logging.getLogger("runner")

STAGE_FILE = "stage.json"


@dataclass(frozen=True)
class Stage:
    """What the flow stage needs from the bootstrap, also as a file across an exec."""

    flow_run: dict[str, Any]  # the API's JSON, as claimed
    deployment: dict[str, Any]
    code_dir: str | None  # the extracted bundle; None: Prefect's own loader places the code
    channel_fd: int


def run(settings: Settings, flow_run_id: uuid.UUID, channel: Sender) -> int:
    """Execute the flow run and return the worker's exit code; never raises (unless it
    execs into the flow's environment, and then never returns).

    Everything the guard needs to know is also sent over ``channel``: ``claimed``
    once the run is ours, ``finished`` with the final state, or ``error``."""
    return _reporting(channel, lambda: _bootstrap(settings, flow_run_id, channel))


def stage_main(stage_file: str, settings: Settings) -> int:
    """``python -m runner worker-stage FILE``: the flow stage after an exec."""
    stage = Stage(**json.loads(Path(stage_file).read_text()))
    channel = Sender(stage.channel_fd)
    return _reporting(channel, lambda: _flow_stage(settings, stage, channel))


def _reporting(channel: Sender, body: Callable[[], int]) -> int:
    try:
        return body()
    except RunnerError as exc:
        channel.send("error", message=str(exc), exit_code=int(exc.exit_code))
        return int(exc.exit_code)
    except BaseException as exc:  # a bug, or a signal the engine turned into an exception
        log.debug("worker stopped by an exception", exc_info=True)
        channel.send(
            "error",
            message=f"worker stopped: {type(exc).__name__}: {exc}",
            exit_code=ExitCode.CRASHED,
        )
        return int(ExitCode.CRASHED)
    finally:
        if "prefect" in sys.modules:  # logs and events queued by the flow stage
            from runner.prefect_api import flush_prefect

            flush_prefect()


def _bootstrap(settings: Settings, flow_run_id: uuid.UUID, channel: Sender) -> int:
    started = time.monotonic()
    with BootstrapApi(flow_run_id, api_wait=settings.api_wait) as api:
        run_log = RunLog(api)
        try:
            flow_run = api.claim()
            resource, related = run_resources(flow_run)
            channel.send("claimed", resource=resource, related=related)
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
            stage = Stage(flow_run, deployment, str(code_dir) if code_dir else None, channel.fd)
            switch = _environment(settings, flow_run, code_dir, stage, run_log)
        finally:
            run_log.flush()
    if switch is not None:
        switch()  # execs: never returns
    return _flow_stage(settings, stage, channel)


def _environment(
    settings: Settings,
    flow_run: dict[str, Any],
    code_dir: Path | None,
    stage: Stage,
    run_log: RunLog,
) -> Callable[[], NoReturn] | None:
    """How to get into the flow's environment: an exec into a container or a built env,
    or None to run the flow stage right here, in the runner's own environment."""
    from runner.environment import image
    from runner.environment.source import find_spec, image_ref

    if ref := image_ref(settings, flow_run):
        run_log.flush()  # a pull can take a while
        argv, channel_fd = image.prepare(
            ref, settings=settings, stage_file=_stage_file(settings), say=run_log.info
        )
        return lambda: _exec(argv, stage, settings, channel_to=channel_fd)
    spec = find_spec(settings, flow_run, code_dir, say=run_log.info)
    if spec is None:
        return None
    from runner.environment.materialize import materialize

    run_log.flush()  # a cold build can take a while: show what is happening
    ready = materialize(spec, settings=settings, say=run_log.info)
    argv = [str(ready.python), "-m", "runner", "worker-stage", str(_stage_file(settings))]
    return lambda: _exec(argv, stage, settings, channel_to=stage.channel_fd)


def _stage_file(settings: Settings) -> Path:
    return settings.run_dir() / STAGE_FILE


def _exec(argv: list[str], stage: Stage, settings: Settings, *, channel_to: int | None) -> NoReturn:
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
    stage_file = _stage_file(settings)
    fd = os.open(stage_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({**asdict(stage), "channel_fd": channel_fd}, out)
    env = {**os.environ, **settings.as_environment()}
    log.info("worker pid %d: exec %s", os.getpid(), " ".join(argv[:3]) + " ...")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


def _flow_stage(settings: Settings, stage: Stage, channel: Sender) -> int:
    """Import Prefect, load the flow from the placed code, and run it through the engine."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.logging.loggers import flow_run_logger

    from runner.execute import load_flow_code, run_in_process

    started = time.monotonic()
    flow_run = FlowRun.model_validate(stage.flow_run)
    deployment = DeploymentResponse.model_validate(stage.deployment)
    run_logger = flow_run_logger(flow_run)
    os.chdir(settings.run_dir())
    flow = load_flow_code(
        flow_run,
        deployment,
        code_dir=Path(stage.code_dir) if stage.code_dir else None,
        run_logger=run_logger,
    )
    run_logger.info("flow code loaded into %s in %.2fs", Path.cwd(), time.monotonic() - started)

    # GC stays paused through the bootstrap (bounded work, few cycles) and is on
    # for the flow's own code.
    gc.enable()
    state = run_in_process(flow, flow_run)
    channel.send("finished", state=state.type.value, name=state.name, message=state.message)
    return int(exit_code_for_state(state.type.value))
