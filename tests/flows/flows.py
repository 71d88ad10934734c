"""Flows the integration tests deploy; each one exercises one outcome."""

import asyncio
import os
import time
from pathlib import Path

from prefect import flow


@flow(log_prints=True, persist_result=True)
def hello(n: int = 21, marker: str | None = None) -> int:
    print(f"hello from the worker, n={n}")
    if marker:  # one line per execution, so a test can count executions
        with open(marker, "a") as fh:
            fh.write(f"{os.getpid()}\n")
    return n * 2


@flow
def fails() -> None:
    raise ValueError("boom: the flow's own error")


@flow(log_prints=True)
def sleeper(pid_file: str, seconds: float = 60) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    print("sleeping")
    time.sleep(seconds)


@flow(log_prints=True, persist_result=True)
async def async_hello(n: int = 5) -> int:
    await asyncio.sleep(0)
    print("hello from an async flow")
    return n + 1


@flow
def spin(seconds: float = 4) -> int:
    """Pure-Python busy loop: holds the GIL the whole time."""
    deadline = time.monotonic() + seconds
    turns = 0
    while time.monotonic() < deadline:
        turns += 1
    return turns


@flow(log_prints=True)
def leaky(seconds: float = 0) -> None:
    """Tries to put the --secret-env value in its logs: a print, a log line, a traceback."""
    from prefect import get_run_logger

    secret = os.environ["RVM_PLANTED_SECRET"]
    print(f"the secret is {secret}")
    get_run_logger().warning("again: %s", secret)
    try:
        raise RuntimeError(f"an error naming {secret}")
    except RuntimeError:
        get_run_logger().exception("caught")
    time.sleep(seconds)


def _note_cancel(flow, flow_run, state) -> None:
    Path(flow_run.parameters["marker"]).write_text(f"on_cancellation ran in {state.type.value}")


@flow(on_cancellation=[_note_cancel])
def cancellable(pid_file: str, marker: str, seconds: float = 120) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)


@flow
def numbered_logs(count: int = 20, pause: float = 1.0) -> int:
    """Logs "line 1".."line COUNT" through the run logger, one every ``pause`` seconds, so a
    test can tell which lines reached the API."""
    from prefect import get_run_logger

    logger = get_run_logger()
    for k in range(1, count + 1):
        logger.info("line %d", k)
        time.sleep(pause)
    return count


@flow(retries=1, persist_result=True)
def preemptible(pid_file: str, release_file: str, seconds: float = 120) -> int:
    """Waits (up to ``seconds``) for ``release_file``, so that a test can preempt it, then
    let its next attempt finish; returns the run's attempt count."""
    from prefect.runtime import flow_run

    Path(pid_file).write_text(str(os.getpid()))
    deadline = time.monotonic() + seconds
    while not Path(release_file).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return flow_run.run_count
