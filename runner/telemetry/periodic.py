"""The guard's periodic events, each from its own thread: ``prefect.flow-run.heartbeat`` and
``runner.metrics``.

They run in the guard, not the worker, so they keep flowing while the flow's
code holds the GIL, and stop when the guard stops: a dead VM goes quiet.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("runner")

Emit = Callable[..., Any]


class Periodic:
    """After ``start()``, emits ``event`` every ``interval`` seconds until ``stop()``,
    with ``payload()`` when given (sampled at each tick).

    The first event comes one interval after the start, not at once: the engine's
    Running event already says the run is alive, and opening the events
    connection right at claim would compete with the worker's start-up."""

    def __init__(
        self,
        *,
        event: str,
        interval: float,
        resource: dict[str, str],
        related: list[dict[str, str]],
        emit: Emit,
        payload: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._event = event
        self._interval = interval
        self._resource = resource
        self._related = related
        self._emit = emit
        self._payload = payload
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"runner-{event}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        # Sleep in one wait on the stop event: stop() ends the loop at once.
        while not self._stop.wait(self._interval):
            try:
                extra = {"payload": self._payload()} if self._payload else {}
                self._emit(
                    event=self._event, resource=self._resource, related=self._related, **extra
                )
            except Exception:  # one lost event must not stop the next
                log.debug("%s failed", self._event, exc_info=True)
