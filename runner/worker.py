"""The worker (child process): claim the flow run, load its code, run it in-process."""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from runner import __version__
from runner.channel import Sender
from runner.errors import ExitCode, RunnerError, exit_code_for_state
from runner.settings import Settings

log = logging.getLogger("runner")


def run(settings: Settings, flow_run_id: uuid.UUID, channel: Sender) -> int:
    """Execute the flow run and return the worker's exit code; never raises.

    Everything the guard needs to know is also sent over ``channel``: ``claimed``
    once the run is ours, ``finished`` with the final state, or ``error``."""
    from runner.prefect_api import flush_prefect

    try:
        return _execute(settings, flow_run_id, channel)
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
        flush_prefect()


def _execute(settings: Settings, flow_run_id: uuid.UUID, channel: Sender) -> int:
    from prefect.logging.loggers import flow_run_logger

    from runner.execute import load_flow_code, run_in_process
    from runner.prefect_api import PrefectApi, flow_run_resources

    started = time.monotonic()
    with PrefectApi.connect(flow_run_id, api_wait=settings.api_wait) as api:
        flow_run = api.claim()
        resource, related = flow_run_resources(flow_run)
        channel.send("claimed", resource=resource, related=related)
        run_logger = flow_run_logger(flow_run)
        run_logger.info(
            "prefect-vm-runner %s claimed flow run %s on %s (worker pid %d) in %.2fs",
            __version__,
            flow_run_id,
            socket.gethostname(),
            os.getpid(),
            time.monotonic() - started,
        )
        deployment = api.read_deployment(flow_run.deployment_id) if flow_run.deployment_id else None

    run_dir = settings.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(run_dir)
    started = time.monotonic()
    flow = load_flow_code(
        flow_run, deployment, settings=settings, run_dir=run_dir, run_logger=run_logger
    )
    run_logger.info("flow code loaded into %s in %.2fs", Path.cwd(), time.monotonic() - started)

    # GC stays paused through the bootstrap (bounded work, few cycles) and is on
    # for the flow's own code.
    gc.enable()
    state = run_in_process(flow, flow_run)
    channel.send("finished", state=state.type.value, name=state.name, message=state.message)
    return int(exit_code_for_state(state.type.value))
