"""An ordered, bounded backlog of requests for the Prefect API, delivered by one background
thread that keeps them through an outage and sends them, in order, once the API is back."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from runner.retry import Backoff

log = logging.getLogger("runner")

T = TypeVar("T")

# Between two tries: 0.5 s, doubling up to 5 s, so the backlog goes out at most 5 s after
# the API is back.
_BACKOFF = Backoff(first=0.5, most=5.0)


class Transient(Exception):
    """Raised by ``deliver`` for a failure worth trying again (the API down or busy)."""


class Outbox(Generic[T]):
    """``put(item)`` from any thread, at once, whatever the API does; ``close(timeout)``
    waits for the backlog and says what could not be sent.

    ``deliver(items)`` sends a prefix of ``items`` (one request) and returns how many it
    is done with (sent, or refused for good: at least one); it raises ``Transient`` to
    have them tried again later. Past ``capacity`` kept items the oldest are dropped: a
    long outage must not grow the guard without bound (each event is about 1 KiB).

    An item waits ``linger`` seconds for others before it is sent, so that what falls due
    together (a heartbeat and a metrics sample) goes in one request."""

    def __init__(
        self,
        deliver: Callable[[list[T]], int],
        *,
        capacity: int,
        batch: int = 200,
        linger: float = 0.0,
    ) -> None:
        self._deliver = deliver
        self._capacity = capacity
        self._batch = batch
        self._linger = linger
        self._items: deque[T] = deque()
        self._ready = threading.Condition()
        self._closing = False
        self._abandoned = False
        self._thread: threading.Thread | None = None
        self._failing_since: float | None = None
        self._dropped = 0  # in the current outage
        self._in_flight = 0

    def put(self, item: T) -> None:
        with self._ready:
            if self._closing:
                raise RuntimeError("outbox closed")
            self._items.append(item)
            self._trim()
            # Started with the first item, never earlier: the guard forks its worker
            # before any thread may exist.
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="runner-outbox", daemon=True)
                self._thread.start()
            self._ready.notify()

    def pending(self) -> int:
        """Items not sent yet (kept, or in a request under way)."""
        with self._ready:
            return len(self._items) + self._in_flight

    def close(self, timeout: float) -> int:
        """Send what is kept, for up to ``timeout`` s; returns how many items were not sent."""
        with self._ready:
            self._closing = True
            self._ready.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._ready:
            self._abandoned = True  # a thread still waiting on the network gives up after
            self._ready.notify()
            return len(self._items) + self._in_flight

    def _trim(self) -> None:
        while len(self._items) > self._capacity:
            self._items.popleft()
            if self._dropped == 0:
                log.warning(
                    "Prefect API unreachable and %d events kept: dropping the oldest",
                    self._capacity,
                )
            self._dropped += 1

    def _run(self) -> None:
        delays = _BACKOFF.delays()
        while True:
            with self._ready:
                while not self._items and not self._closing:
                    self._ready.wait()
                if self._linger and not self._closing:
                    self._ready.wait_for(lambda: self._closing, timeout=self._linger)
                if not self._items or self._abandoned:
                    return
                # Taken out while in flight, so that dropping the oldest meanwhile cannot
                # drop the wrong ones; what is not sent goes back in front.
                batch = [self._items.popleft() for _ in range(min(self._batch, len(self._items)))]
                self._in_flight = len(batch)
            try:
                sent = self._deliver(batch)
            except Transient as exc:
                self._note_failure(exc)
                self._put_back(batch)
                with self._ready:
                    # Sleep on the condition: close() does not cut the wait short (the
                    # backlog is still tried until its deadline), but abandoning does.
                    self._ready.wait_for(lambda: self._abandoned, timeout=next(delays))
                continue
            except Exception:  # a bug in deliver: drop the first item, not the run's events
                log.warning("could not send a runner event; dropped it", exc_info=True)
                sent = 1
            else:
                self._note_recovery()
            delays = _BACKOFF.delays()
            self._put_back(batch[max(sent, 1) :])

    def _put_back(self, items: list[T]) -> None:
        with self._ready:
            self._items.extendleft(reversed(items))
            self._in_flight = 0
            self._trim()

    def _note_failure(self, exc: Exception) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("Prefect API unreachable (%s); keeping events until it is back", exc)

    def _note_recovery(self) -> None:
        if self._failing_since is None:
            return
        with self._ready:
            dropped, self._dropped = self._dropped, 0
        log.info(
            "Prefect API reachable again after %.0fs; sending the events kept meanwhile%s",
            time.monotonic() - self._failing_since,
            f" ({dropped} oldest dropped)" if dropped else "",
        )
        self._failing_since = None
