"""Notice that the cloud is about to take this spot/preemptible VM back, polled from the
instance metadata service (each cloud's check in its module in ``runner.vm.clouds``);
``on_notice`` is called once, from a thread, so the guard's own loop never waits on the
network."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from runner.vm import clouds

log = logging.getLogger("runner")


class SpotWatch:
    """``SpotWatch("aws", settings.metadata_urls(), poll_seconds=5, on_notice=...)``;
    ``start()``, ``stop()``. ``on_notice(description)`` gets one short line, at most once."""

    def __init__(
        self,
        cloud: str,
        urls: dict[str, str],
        *,
        poll_seconds: float,
        on_notice: Callable[[str], None],
    ) -> None:
        self._cloud = cloud
        self._urls = urls
        self._poll_seconds = poll_seconds
        self._on_notice = on_notice
        self._stopping = threading.Event()
        self._fired = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._poll, name="runner-spot-poll", daemon=True)

    def start(self) -> None:
        """Off a known cloud, or with polling off, there is nothing to watch."""
        if self._cloud in clouds.CLOUDS and self._poll_seconds > 0:
            self._thread.start()

    def stop(self) -> None:
        """Returns at once; a request in flight ends within its short timeout, unheard."""
        self._stopping.set()

    def _fire(self, description: str) -> None:
        with self._lock:
            if self._fired or self._stopping.is_set():
                return
            self._fired = True
        log.info("preemption notice: %s", description)
        self._on_notice(description)

    def _poll(self) -> None:
        check = clouds.load(self._cloud).spot_notice(self._urls[self._cloud])
        while not self._stopping.is_set():
            try:
                description = check()
            except Exception as exc:  # down, 5xx or an odd body: ask again next tick
                log.debug("polling %s for a preemption notice: %s", self._cloud, exc)
                description = None
            if description is not None:
                self._fire(description)
                return
            self._stopping.wait(self._poll_seconds)
