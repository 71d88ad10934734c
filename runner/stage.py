"""The flow stage: import Prefect, load the flow from its placed code, and run it through
the engine; in the worker's own process, or after its exec into an env or a container.

Light on purpose: after an exec, ``python -m runner worker-stage FILE`` comes
straight here (see ``__main__``), so the new interpreter imports little besides
Prefect itself; everything it needs from the bootstrap is in the stage file.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runner import prefect_compat
from runner.channel import ENGINE_INTENTS, Error, Finished, Phase, Sender
from runner.errors import ExitCode, RunnerError, exit_code_for_state
from runner.prefect_rest import (
    ApiBusy,
    ApiLost,
    api_failure,
    prefect_client_retries,
    prefect_client_seconds,
)

log = logging.getLogger("runner")


@dataclass(frozen=True)
class Stage:
    """What the flow stage needs from the bootstrap; a file across an exec."""

    flow_run: dict[str, Any]  # the API's JSON, as claimed
    deployment: dict[str, Any]
    code_dir: str | None  # the extracted bundle; None: Prefect's own loader places the code
    pull_steps: list[dict[str, Any]]  # the deployment's pull steps still to run
    run_dir: str
    log_level: str
    channel_fd: int  # -1: no guard to tell (a container without a passed descriptor)
    log_file: str | None = None  # the run's log file, which the runner's lines also go to
    api_wait: float = 60.0  # --api-wait: how long Prefect's client retries the API too

    def write(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds run data
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(self), out)

    @classmethod
    def read(cls, path: str) -> Stage:
        return cls(**json.loads(Path(path).read_text()))


def main(stage_file: str) -> int:
    """``python -m runner worker-stage FILE``: the flow stage after the worker's exec."""
    from runner import logs

    try:
        stage = Stage.read(stage_file)
    except (OSError, ValueError, TypeError) as exc:  # a lost file, or host and image skew
        logs.configure("INFO")
        log.error("cannot read the flow stage file %s: %s", stage_file, exc)
        return int(ExitCode.BOOTSTRAP_ERROR)
    logs.configure(stage.log_level)
    if stage.log_file:
        logs.capture(Path(stage.log_file))
    channel = Sender(stage.channel_fd)
    return reporting(channel, lambda: run(stage, channel))


def reporting(channel: Sender, body: Callable[[], int]) -> int:
    """Run ``body``; tell the guard how it ended (``error`` with the line and exit code
    when it raised) and return the exit code. Never raises."""
    try:
        return body()
    except RunnerError as exc:
        if channel.fd < 0:  # nobody to tell but the log (a container without a channel)
            log.error("%s", exc)
        channel.send(Error(message=str(exc), exit_code=int(exc.exit_code)))
        return int(exc.exit_code)
    except BaseException as exc:  # a bug, or a signal the engine turned into an exception
        log.debug("worker stopped by an exception", exc_info=True)
        message = f"worker stopped: {type(exc).__name__}: {exc}"
        channel.send(Error(message=message, exit_code=int(ExitCode.CRASHED)))
        return int(ExitCode.CRASHED)
    finally:
        if "prefect" in sys.modules:  # logs and events queued by the flow stage
            prefect_compat.flush()


# The flow and its run once loaded: what a cancel needs on a Prefect whose engine cannot
# be told that a SIGTERM is a cancel.
_running: tuple[Any, Any] | None = None
# How long a stop without the engine waits for the flow's queued logs to reach the API.
_FLUSH_SECONDS = 10.0


def _stop_with_intent(signum: int, _frame: object) -> None:
    """SIGUSR1 (the run is Cancelling) or SIGUSR2 (preempted, or past --max-runtime) from
    the guard: stop the flow as Prefect's own supervisor does. The engine is told what the
    SIGTERM that follows means: for a cancel it runs the flow's on_cancellation hooks and
    ends the run Cancelled; for "relinquish" it stops without proposing a state, because
    the guard proposes the next one (AwaitingRetry, or Crashed with the reason).

    An engine that cannot be told (an older Prefect: runner/prefect_compat.py) would take
    the SIGTERM for a crash and force Crashed over the guard's state. This process then
    leaves without it: the cancel's hooks run here first, the queued logs are sent, and
    the guard proposes the state (Cancelled, AwaitingRetry or Crashed) as it does for a
    worker that died."""
    intent = ENGINE_INTENTS[signal.Signals(signum)]
    for asked in ENGINE_INTENTS:  # once is enough
        signal.signal(asked, signal.SIG_IGN)
    if prefect_compat.tell_engine(intent):
        signal.raise_signal(signal.SIGTERM)
        return
    log.info("this Prefect's engine cannot be told why it is stopped: the runner stops it")
    if intent == "cancel" and _running is not None:
        prefect_compat.run_cancellation_hooks(*_running)
    # In a thread, bounded: this handler may have interrupted a logging call that holds
    # a lock the flush needs.
    flushing = threading.Thread(target=prefect_compat.flush, args=(_FLUSH_SECONDS,), daemon=True)
    flushing.start()
    flushing.join(_FLUSH_SECONDS)
    os._exit(128 + signal.SIGTERM)  # as a SIGTERM would end it, and nothing runs after


def run(stage: Stage, channel: Sender) -> int:
    """Import Prefect, load the flow from the placed code, and run it through the engine."""
    # Ride out a Prefect API outage for --api-wait, as the runner's own calls do: the
    # engine's states, the code load's reads and the flow's log batches are retried by
    # Prefect's client with a doubling backoff (2, 4, 8... s), as many times as it takes
    # to cover --api-wait (60 s: 6 retries, about two minutes), after which the run ends
    # Crashed. Read when Prefect is imported, just below; a value set by the user wins.
    retries = prefect_client_retries(stage.api_wait)
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", str(retries))
    # And a 500, which Prefect's client does not retry by default (429, 502, 503 only):
    # a loaded server answers one now and then, and the run's own calls must not die of it
    # (the runner's REST calls retry it too: runner/prefect_rest.py).
    os.environ.setdefault("PREFECT_CLIENT_RETRY_EXTRA_CODES", "500")
    budget = _client_seconds(retries)
    for asked in ENGINE_INTENTS:
        signal.signal(asked, _stop_with_intent)
    # The engine now, not at its first use: importing it configures Prefect's logging,
    # whose handlers the mask wraps just below (a flow's log lines go through them).
    import prefect.flow_engine  # noqa: F401
    from prefect.client.schemas.objects import FlowRun
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.logging.loggers import flow_run_logger

    from runner.execute import load_flow_code, run_in_process
    from runner.redaction import mask_all_handlers

    mask_all_handlers()  # Prefect's logging is configured by now
    prefect_compat.quiet_reconnects()
    started = time.monotonic()
    flow_run = FlowRun.model_validate(stage.flow_run)
    deployment = DeploymentResponse.model_validate(stage.deployment)
    run_logger = flow_run_logger(flow_run)
    os.chdir(stage.run_dir)
    with _api_failures("loading the flow's code", budget, after_start=False):
        flow = load_flow_code(
            flow_run,
            deployment,
            code_dir=Path(stage.code_dir) if stage.code_dir else None,
            pull_steps=stage.pull_steps,
            run_logger=run_logger,
        )
    global _running
    _running = (flow, flow_run)
    seconds = time.monotonic() - started
    run_logger.info("flow code loaded into %s in %.2fs", Path.cwd(), seconds)
    if stage.code_dir is None:  # Prefect's own loader placed the code just now
        channel.send(Phase("code-pulled", {"seconds": round(seconds, 3)}))

    # GC stays paused through the bootstrap (bounded work, few cycles) and is on
    # for the flow's own code.
    gc.enable()
    channel.send(Phase("flow-started"))
    started = time.monotonic()
    with _api_failures("running the flow", budget, after_start=True):
        state = run_in_process(flow, flow_run)
    seconds = round(time.monotonic() - started, 3)
    channel.send(Phase("flow-finished", {"seconds": seconds, "state": state.type.value}))
    channel.send(Finished(state=state.type.value, name=state.name, message=state.message))
    return int(exit_code_for_state(state.type.value))


def _client_seconds(retries: int) -> float:
    """About how long Prefect's client retries, with the retries in effect (the user's
    PREFECT_CLIENT_MAX_RETRIES, where set, else ``retries``)."""
    try:
        return prefect_client_seconds(int(os.environ["PREFECT_CLIENT_MAX_RETRIES"]))
    except (KeyError, ValueError):
        return prefect_client_seconds(retries)


@contextlib.contextmanager
def _api_failures(doing: str, seconds: float, *, after_start: bool) -> Iterator[None]:
    """An error out of Prefect's client for a Prefect API that kept failing past its
    retries (a 5xx, a timeout) becomes the runner's one line naming the endpoint and the
    status: exit 3 before the flow started, exit 5 (the run ends Crashed) after."""
    try:
        yield
    except Exception as exc:
        error = ApiLost if after_start else ApiBusy
        lost = api_failure(exc, doing=doing, seconds=seconds, error=error)
        if lost is None:
            raise
        raise lost from exc
