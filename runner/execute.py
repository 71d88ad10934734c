"""Import a flow run's flow from its placed code, and run it in this process through
Prefect's flow engine."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner import prefect_compat
from runner.errors import CodeLoadError, RunnerError

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.flows import Flow
    from prefect.states import State


def load_flow_code(
    flow_run: FlowRun,
    deployment: DeploymentResponse,
    *,
    code_dir: Path | None,
    pull_steps: list[dict[str, Any]],
    run_logger: logging.LoggerAdapter,
) -> Flow:
    """Import the flow from the deployment's entrypoint.

    With a code bundle (already extracted into ``code_dir`` by the worker's
    bootstrap) the deployment's other ``pull_steps`` run through Prefect's step
    runner; without one, Prefect's own loader handles the deployment's storage,
    path and pull steps."""
    try:
        if code_dir is None:
            return prefect_compat.load_flow(flow_run)
        os.chdir(code_dir)
        if pull_steps:
            output = prefect_compat.run_steps(
                pull_steps,
                print_function=run_logger.info,
                deployment=deployment,
                flow_run=flow_run,
                logger=run_logger,
            )
            if output.get("directory"):
                os.chdir(output["directory"])
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return prefect_compat.load_flow_from_entrypoint(deployment.entrypoint)
    except RunnerError:
        raise
    except Exception as exc:
        root = exc.__cause__ or getattr(exc, "user_exc", None) or exc
        run_logger.error("Could not load the flow's code", exc_info=True)
        raise CodeLoadError(
            f"could not load the flow's code for deployment {deployment.name!r} "
            f"(entrypoint {deployment.entrypoint}): {type(root).__name__}: {root}"
        ) from exc


def run_in_process(flow: Flow, flow_run: FlowRun) -> State:
    """Run the flow through the engine, which reports Running and the final state itself."""
    # The guard sends this run's heartbeats; the engine's own heartbeat thread would
    # double them, and the engine waits up to a second for it to stop at the end.
    from prefect.logging.loggers import flow_run_logger

    with prefect_compat.engine_heartbeats_off():
        state = prefect_compat.run_flow(flow, flow_run, error_logger=flow_run_logger(flow_run))
        if inspect.isawaitable(state):  # async flows hand back a coroutine
            state = asyncio.run(state)
    return state
