"""The guard's event sender: REST first; an API without POST /events hands over to
Prefect's own events client."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from runner.telemetry.sender import EventSender

POSTS: list[str] = []


class _NoEvents(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        POSTS.append(self.path)
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_an_api_without_the_events_endpoint_falls_back_to_prefects_client(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoEvents)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{server.server_address[1]}/api")
    sender = EventSender()
    event = {"event": "runner.test", "resource": {"prefect.resource.id": "x"}}

    sender.send(**event)
    sender.send(**event)  # no second POST: straight to Prefect's client

    assert POSTS == ["/api/events"]
    sender.close()
    server.shutdown()


def test_a_failing_api_raises_for_the_caller_to_log(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with pytest.raises(Exception):  # noqa: B017  (any transport error)
        EventSender().send(event="runner.test", resource={"prefect.resource.id": "x"})
