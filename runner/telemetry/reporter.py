"""What the guard tells Prefect about a claimed run while it lasts: heartbeats, hardware
metrics and ``runner.phase.<name>`` events, from the worker's messages and the guard's
own clock."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from runner.channel import Claimed, Message, Phase
from runner.telemetry.metrics import Sampler
from runner.telemetry.periodic import Emit, Periodic
from runner.telemetry.summary import Usage, render
from runner.vm.metadata import Machine
from runner.vm.prices import Price

log = logging.getLogger("runner")

PHASES = ("claimed", "code-pulled", "env-ready", "flow-started", "flow-finished", "teardown")


class RunTelemetry:
    """Started by the worker's ``claimed`` message; ``phase`` messages become events.

    ``emit`` must return at once (the guard's EventSender queues each event for its
    own sending thread): it is called from the supervision loop. The teardown event
    is the last one."""

    def __init__(
        self,
        *,
        started: float,
        heartbeat_seconds: float,
        metrics_seconds: float,
        emit: Emit,
    ) -> None:
        self.worker_pid = 0  # set once the worker is forked
        self.machine: Callable[[], Machine | None] = lambda: None  # the VM, once known
        self._started = started
        self._heartbeat_seconds = heartbeat_seconds
        self._metrics_seconds = metrics_seconds
        self._emit = emit
        self._resource: dict[str, str] | None = None
        self._claimed_after = 0.0
        self._related: list[dict[str, str]] = []
        self._periodic: list[Periodic] = []
        # For the summary artifact.
        self.usage = Usage()
        self._phase_seconds: dict[str, float] = {}
        self._bytes_downloaded = 0
        self._cache_hits: dict[str, bool] = {}
        self._state: str | None = None

    def on_message(self, message: Message) -> None:
        if isinstance(message, Claimed) and self._resource is None:
            self._resource, self._related = message.resource, message.related
            if (machine := self.machine()) is not None:
                self._related = [*self._related, machine.resource()]
            self._start_periodic()
            self._claimed_after = self.elapsed()
            self.phase("claimed", seconds=round(self._claimed_after, 3))
        elif isinstance(message, Phase) and self._resource is not None:
            self._note(message.name, message.details)
            self.phase(message.name, **message.details)

    def _note(self, name: str, details: dict[str, Any]) -> None:
        if "seconds" in details:
            self._phase_seconds[name] = float(details["seconds"])
        self._bytes_downloaded += int(details.get("bytes_downloaded") or 0)
        if "cache_hit" in details:
            self._cache_hits["bundle" if name == "code-pulled" else "environment"] = bool(
                details["cache_hit"]
            )
        self._state = details.get("state", self._state)

    def summary(self, *, exit_code: int, price: Price | None) -> str | None:
        """The runner-summary markdown, or None when no run was claimed."""
        if self._resource is None:
            return None
        return render(
            phases={**{"claimed": self._claimed_after}, **self._phase_seconds},
            usage=self.usage,
            bytes_downloaded=self._bytes_downloaded,
            cache_hits=self._cache_hits,
            exit_code=exit_code,
            state=self._state,
            wall_seconds=self.elapsed(),
            price=price,
        )

    @property
    def claimed(self) -> bool:
        """Whether the worker claimed the run (so this runner owns its directory)."""
        return self._resource is not None

    def phase(self, name: str, **payload: Any) -> None:
        self.event(f"runner.phase.{name}", **payload)

    def event(self, name: str, **payload: Any) -> None:
        """Queue one event about the claimed run (none before the claim)."""
        if self._resource is None:
            return
        event = {
            "event": name,
            # When it happened, not when the sender thread gets to it.
            "occurred": datetime.now(timezone.utc),
            "resource": self._resource,
            "related": self._related,
            "payload": {**payload, "elapsed_seconds": round(self.elapsed(), 3)},
        }
        try:
            self._emit(**event)
        except Exception:  # a lost event must not stop the run's others
            log.debug("%s failed", name, exc_info=True)

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def close(self, *, exit_code: int) -> None:
        """Stop the periodic events, then send the teardown phase, last."""
        for periodic in self._periodic:
            periodic.stop()
        if self._resource is None:
            return
        self.phase("teardown", exit_code=exit_code)

    def _start_periodic(self) -> None:
        assert self._resource is not None
        common = {"resource": self._resource, "related": self._related, "emit": self._emit}
        if self._heartbeat_seconds > 0:
            self._periodic.append(
                Periodic(
                    event="prefect.flow-run.heartbeat", interval=self._heartbeat_seconds, **common
                )
            )
        if self._metrics_seconds > 0:
            sampler = Sampler(self.worker_pid)

            def sample() -> dict[str, Any]:
                taken = sampler.sample()
                self.usage.add(taken)
                return taken

            self._periodic.append(
                Periodic(
                    event="runner.metrics", interval=self._metrics_seconds, payload=sample, **common
                )
            )
        for periodic in self._periodic:
            periodic.start()
