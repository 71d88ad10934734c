"""Send the guard's events and its summary artifact through Prefect's REST API (``POST
/events``, ``POST /artifacts/``: runner/prefect_rest.py), so that the guard never imports
Prefect: it stays small (its memory is on every VM for the whole run). Where the API has
no ``/events`` endpoint, Prefect's own events client takes over."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import httpx

from runner.errors import RunnerError
from runner.prefect_rest import ApiBusy, PrefectRest
from runner.redaction import mask, scrub
from runner.telemetry.outbox import Outbox, Transient

log = logging.getLogger("runner")

T = TypeVar("T")

# A day of heartbeats and metrics at 30 s, about 5 MiB; an hour at the tests' 1 s.
CAPACITY = 6000
# How long close() keeps trying to send the backlog: the run is over, and a VM that
# waits longer for an unreachable API only bills longer.
CLOSE_TIMEOUT = 30.0
# How long an event waits for others to go in the same POST: a heartbeat and a metrics
# sample fall due together (both periods start at the claim), a few ms apart, and went
# out in two requests. A fifth of a second is nothing to a heartbeat's 30 s period.
LINGER = 0.2


@dataclass(frozen=True)
class _Request:
    path: str  # "events" (batched with its neighbours) or "artifacts/"
    body: dict[str, Any]


class EventSender:
    """``send(event=..., resource=..., related=..., payload=..., occurred=...)`` and
    ``write_artifact(...)`` from any thread: they return at once and never fail for an API
    that is down. Requests go out in order from one background thread; through an outage
    they are kept (the oldest dropped past ``capacity``) and sent when the API is back,
    each event with the time it happened. ``close()`` waits for them, up to a deadline.

    Every event is kept, heartbeats too, rather than only the latest heartbeat: they
    are small, they are the record that the machine was alive through the outage, and
    the operator then sees no gap in the run's events."""

    def __init__(self, *, capacity: int = CAPACITY) -> None:
        self._api: PrefectRest | None = None
        self._fallback = False
        self._outbox: Outbox[_Request] = Outbox(self._deliver, capacity=capacity, linger=LINGER)

    def send(self, **event: Any) -> None:
        # Runner events carry no secret by design; masking them anyway costs microseconds.
        event = {key: scrub(value) if key != "occurred" else value for key, value in event.items()}
        occurred = event.get("occurred") or datetime.now(timezone.utc)
        body = {
            "id": str(uuid.uuid4()),  # the same on every try: the server keeps one copy
            "occurred": occurred.isoformat(),
            "event": event["event"],
            "resource": event["resource"],
            "related": event.get("related") or [],
            "payload": event.get("payload") or {},
        }
        self._outbox.put(_Request("events", body))

    def write_artifact(
        self, *, flow_run_id: uuid.UUID, key: str, markdown: str, description: str
    ) -> None:
        body = {
            "key": key,
            "type": "markdown",
            "data": mask(markdown),
            "description": description,
            "flow_run_id": str(flow_run_id),
        }
        self._outbox.put(_Request("artifacts/", body))

    def pending(self) -> int:
        """Requests not sent yet."""
        return self._outbox.pending()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Send what is kept, for up to ``timeout`` s, then let go of the connection."""
        if unsent := self._outbox.close(timeout):
            log.warning(
                "%d runner event(s) not sent: the Prefect API did not answer within %gs",
                unsent,
                timeout,
            )
        if self._api is not None:
            self._api.close()

    def _deliver(self, requests: list[_Request]) -> int:
        """Send the first request, with the events that follow it in one POST; return how
        many requests that was. A request the API refuses (401, 422...) is dropped with a
        warning: sending it again would not help."""
        first = requests[0]
        if first.path != "events":
            try:
                self._call(lambda api: api.create_artifact(first.body))
            except RunnerError as exc:
                log.warning("Prefect API refused the run summary artifact: %s", exc)
            return 1
        events = []
        for request in requests:
            if request.path != "events":
                break
            events.append(request.body)
        try:
            if self._fallback:
                _prefect_emit(events)
            elif not self._call(lambda api: api.post_events(events)):  # no POST /events
                log.info("Prefect API has no POST /events; sending events through Prefect's client")
                self._fallback = True
                _prefect_emit(events)
        except RunnerError as exc:
            log.warning("Prefect API refused %d runner event(s): %s", len(events), exc)
        return len(events)

    def _call(self, request: Callable[[PrefectRest], T]) -> T:
        """One request; what may pass (no answer, 5xx, 429) is ``Transient``: the outbox
        tries it again later."""
        if self._api is None:  # only the outbox's thread gets here
            self._api = PrefectRest(timeout=httpx.Timeout(15.0, connect=5.0))
        try:
            return request(self._api)
        except ApiBusy as exc:
            raise Transient(exc.problem) from exc


def _prefect_emit(events: list[dict[str, Any]]) -> None:
    from runner.prefect_compat import emit

    for event in events:
        emit(
            event=event["event"],
            resource=event["resource"],
            related=event["related"],
            payload=event["payload"],
            occurred=datetime.fromisoformat(event["occurred"]),
            id=uuid.UUID(event["id"]),
        )
