"""One way to try again: exponential backoff, bounded by a number of attempts or by time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Waits of ``first`` s, doubling up to ``most`` s."""

    first: float
    most: float = float("inf")

    def delays(self) -> Iterator[float]:
        delay = self.first
        while True:
            yield delay
            delay = min(delay * 2, self.most)


def retry(
    call: Callable[[], T],
    *,
    on: type[Exception] | tuple[type[Exception], ...],
    backoff: Backoff,
    attempts: int | None = None,
    seconds: float | None = None,
    before_retry: Callable[[Exception, int, float], None] | None = None,
) -> T:
    """``call()`` until it returns. An ``on`` error is tried again after the next wait,
    until ``attempts`` calls are made or ``seconds`` have passed (the last wait is cut to
    fit); then it is raised. ``before_retry(error, retries_so_far, wait)`` says so first."""
    deadline = None if seconds is None else time.monotonic() + seconds
    for done, delay in enumerate(backoff.delays(), start=1):
        try:
            return call()
        except on as exc:
            if attempts is not None and done >= attempts:
                raise
            if deadline is not None:
                delay = min(delay, deadline - time.monotonic())
                if delay <= 0:
                    raise
            if before_retry is not None:
                before_retry(exc, done, delay)
            time.sleep(delay)
    raise AssertionError("unreachable: delays() never ends")
