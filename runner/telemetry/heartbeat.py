"""The guard's heartbeat: ``prefect.flow-run.heartbeat`` events on a fixed period, from a thread.

It runs in the guard, not the worker, so heartbeats keep flowing while the
flow's code holds the GIL, and stop when the guard stops: a dead VM goes quiet.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("runner")

Emit = Callable[..., Any]


class Heartbeat:
    """After ``start()``, emits every ``interval`` seconds until ``stop()``.

    The first beat comes one interval after the start, not at once: the engine's
    Running event already says the run is alive, and opening the events
    connection right at claim would compete with the worker's start-up."""

    def __init__(
        self,
        *,
        interval: float,
        resource: dict[str, str],
        related: list[dict[str, str]],
        emit: Emit,
    ) -> None:
        self._interval = interval
        self._resource = resource
        self._related = related
        self._emit = emit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="runner-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._emit(
                    event="prefect.flow-run.heartbeat",
                    resource=self._resource,
                    related=self._related,
                )
            except Exception:  # one lost beat must not stop the next
                log.debug("heartbeat failed", exc_info=True)
