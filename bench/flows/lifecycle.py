"""The lifecycle benchmark's flows: one that waits to be stopped, one that marks its end."""

import os
import time
from pathlib import Path

from prefect import flow


@flow
def sleeper(pid_file: str, seconds: float = 120) -> None:
    """Writes the pid of the process the flow runs in, then sleeps (to be cancelled or
    preempted)."""
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)


@flow
def stamp_end(stamp: str) -> None:
    """Returns at once; its last statement records when the flow body ended."""
    Path(stamp).write_text(repr(time.time()))
