"""Load a flow run's code and run it in this process through Prefect's flow engine."""

from __future__ import annotations

import asyncio
import inspect
import sys
from pathlib import Path

from prefect.client.schemas.objects import FlowRun
from prefect.flow_engine import load_flow, run_flow
from prefect.flows import Flow
from prefect.logging.loggers import flow_run_logger
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import State

from runner.errors import CodeLoadError


def load_flow_code(flow_run: FlowRun, workdir: Path) -> Flow:
    """Place the deployment's code in ``workdir`` (its storage or pull steps, run by
    Prefect's own step runner) and import the flow from its entrypoint."""
    if flow_run.deployment_id is None:
        raise CodeLoadError(
            f"flow run {flow_run.id} has no deployment, so there is no code to load; "
            "create it from a deployment"
        )
    run_logger = flow_run_logger(flow_run)
    try:
        return load_flow(flow_run)
    except Exception as exc:
        root = exc.__cause__ or getattr(exc, "user_exc", None) or exc
        run_logger.error("Could not load the flow's code", exc_info=True)
        raise CodeLoadError(
            f"could not load the flow's code for deployment {flow_run.deployment_id} "
            f"in {workdir}: {type(root).__name__}: {root}"
        ) from exc
    finally:
        # Pull steps may chdir; the flow's own imports resolve from where it landed.
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))


def run_in_process(flow: Flow, flow_run: FlowRun) -> State:
    """Run the flow through the engine, which reports Running and the final state itself."""
    # The guard sends this run's heartbeats; the engine's own heartbeat thread would
    # double them, and the engine waits up to a second for it to stop at the end.
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        state = run_flow(
            flow, flow_run=flow_run, return_type="state", error_logger=flow_run_logger(flow_run)
        )
        if inspect.isawaitable(state):  # async flows hand back a coroutine
            state = asyncio.run(state)
    return state
