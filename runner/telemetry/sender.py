"""Send the guard's events and its summary artifact through Prefect's REST API (``POST
/events``, ``POST /artifacts/``) with httpx, so that the guard never imports Prefect: it
stays small (its memory is on every VM for the whole run). Where the API has no
``/events`` endpoint, Prefect's own events client takes over."""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime, timezone
from typing import Any

import httpx

from runner.bootstrap_api import connection
from runner.redaction import mask, scrub

log = logging.getLogger("runner")


class EventSender:
    """``send(event=..., resource=..., related=..., payload=..., occurred=...)``, from any
    thread; raises on failure (the callers log and go on)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._http: httpx.Client | None = None
        self._fallback = False

    def send(self, **event: Any) -> None:
        # Runner events carry no secret by design; masking them anyway costs microseconds.
        event = {key: scrub(value) if key != "occurred" else value for key, value in event.items()}
        if self._fallback:
            return _prefect_emit(**event)
        occurred = event.get("occurred") or datetime.now(timezone.utc)
        body = [
            {
                "id": str(uuid.uuid4()),
                "occurred": occurred.isoformat(),
                "event": event["event"],
                "resource": event["resource"],
                "related": event.get("related") or [],
                "payload": event.get("payload") or {},
            }
        ]
        response = self._client().post("events", json=body)
        if response.status_code in (404, 405):  # an API without the REST endpoint
            log.info("Prefect API has no POST /events; sending events through Prefect's client")
            self._fallback = True
            return _prefect_emit(**event)
        response.raise_for_status()

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
        self._client().post("artifacts/", json=body).raise_for_status()

    def close(self) -> None:
        with self._lock:
            if self._http is not None:
                self._http.close()
                self._http = None

    def _client(self) -> httpx.Client:
        with self._lock:
            if self._http is None:
                url, headers = connection()
                self._http = httpx.Client(
                    base_url=url + "/", headers=headers, timeout=httpx.Timeout(15.0, connect=5.0)
                )
            return self._http


def _prefect_emit(**event: Any) -> None:
    from runner.prefect_api import emit

    emit(**event)
