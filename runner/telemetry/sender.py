"""Send the guard's events and its summary artifact through Prefect's REST API (``POST
/events``, ``POST /artifacts/``) with httpx, so that the guard never imports Prefect: it
stays small (its memory is on every VM for the whole run). Where the API has no
``/events`` endpoint, Prefect's own events client takes over."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx

from runner.bootstrap_api import api_client
from runner.redaction import mask, scrub
from runner.telemetry.outbox import Outbox, Transient

log = logging.getLogger("runner")

# Worth trying again: the API is restarting, overloaded or behind a proxy that lost it.
_RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
# A day of heartbeats and metrics at 30 s, about 5 MiB; an hour at the tests' 1 s.
CAPACITY = 6000
# How long close() keeps trying to send the backlog: the run is over, and a VM that
# waits longer for an unreachable API only bills longer.
CLOSE_TIMEOUT = 30.0


class _Refused(Exception):
    """The API answered, and said no."""


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
        self._http: httpx.Client | None = None
        self._fallback = False
        self._outbox: Outbox[_Request] = Outbox(self._deliver, capacity=capacity)

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
        if self._http is not None:
            self._http.close()

    def _deliver(self, requests: list[_Request]) -> int:
        """Send the first request, with the events that follow it in one POST; return how
        many requests that was. A request the API refuses (401, 422...) is dropped with a
        warning: sending it again would not help."""
        first = requests[0]
        if first.path != "events":
            try:
                self._post(first.path, first.body)
            except _Refused as exc:
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
            elif self._post("events", events) in (404, 405):  # an API without POST /events
                log.info("Prefect API has no POST /events; sending events through Prefect's client")
                self._fallback = True
                _prefect_emit(events)
        except _Refused as exc:
            log.warning("Prefect API refused %d runner event(s): %s", len(events), exc)
        return len(events)

    def _post(self, path: str, body: Any) -> int:
        """POST, raising ``Transient`` for what may pass; returns the status (404/405 too,
        for the events fallback)."""
        try:
            response = self._client().post(path, json=body)
        except httpx.TransportError as exc:
            raise Transient(type(exc).__name__) from exc
        if response.status_code in _RETRY_STATUSES:
            raise Transient(f"HTTP {response.status_code}")
        if path == "events" and response.status_code in (404, 405):
            return response.status_code
        if response.is_error:  # the status alone: the URL is the user's to see, not the log's
            raise _Refused(f"HTTP {response.status_code} for POST /{path}")
        return response.status_code

    def _client(self) -> httpx.Client:
        # Only the outbox's thread gets here.
        if self._http is None:
            self._http = api_client(timeout=httpx.Timeout(15.0, connect=5.0))
        return self._http


def _prefect_emit(events: list[dict[str, Any]]) -> None:
    from runner.prefect_api import emit

    for event in events:
        emit(
            event=event["event"],
            resource=event["resource"],
            related=event["related"],
            payload=event["payload"],
            occurred=datetime.fromisoformat(event["occurred"]),
            id=uuid.UUID(event["id"]),
        )
