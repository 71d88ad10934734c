"""The guard's event sender: REST first, an API without POST /events hands over to Prefect's
own events client; through an outage events are kept, in order, and sent when it ends."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from devtools.server_process import free_port
from runner.telemetry.sender import EventSender

RESOURCE = {"prefect.resource.id": "x"}


class _Api(BaseHTTPRequestHandler):
    """Answers every POST with the server's ``status``, and records what it was sent."""

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.posts.append((self.path, json.loads(self.rfile.read(length) or b"null")))  # type: ignore[attr-defined]
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextmanager
def api(port: int = 0, status: int = 200) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Api)
    server.posts, server.status = [], status  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _wait(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_an_api_without_the_events_endpoint_falls_back_to_prefects_client(monkeypatch):
    with api(status=405) as server:
        monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{server.server_port}/api")
        sender = EventSender()

        sender.send(event="runner.test", resource=RESOURCE)
        _wait(lambda: sender.pending() == 0)
        sender.send(event="runner.test", resource=RESOURCE)  # no second POST: Prefect's client
        sender.close(timeout=10)

        assert [path for path, _ in server.posts] == ["/api/events"]


def test_events_kept_through_an_outage_go_out_in_order_with_their_times(monkeypatch, caplog):
    port = free_port()  # nothing listens there yet: the API is down
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    sender = EventSender()
    start = datetime.now(timezone.utc) - timedelta(minutes=1)
    times = [start + timedelta(seconds=k) for k in range(3)]

    with caplog.at_level(logging.INFO, logger="runner"):
        for k, when in enumerate(times):
            started = time.monotonic()
            sender.send(event=f"runner.test.{k}", resource=RESOURCE, occurred=when)
            assert time.monotonic() - started < 0.1  # never waits on the network
        _wait(lambda: "unreachable" in caplog.text)
        assert sender.pending() == 3

        with api(port) as server:  # the API is back
            sender.write_artifact(flow_run_id=uuid.uuid4(), key="k", markdown="m", description="d")
            sender.close(timeout=10)

    assert [path for path, _ in server.posts] == ["/api/events", "/api/artifacts/"]
    sent = server.posts[0][1]
    assert [e["event"] for e in sent] == ["runner.test.0", "runner.test.1", "runner.test.2"]
    assert [datetime.fromisoformat(e["occurred"]) for e in sent] == times
    assert "reachable again" in caplog.text


def test_a_long_outage_keeps_the_newest_events_and_close_gives_up(monkeypatch, caplog):
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    sender = EventSender(capacity=2)
    for k in range(5):
        sender.send(event=f"runner.test.{k}", resource=RESOURCE)

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="runner"):
        sender.close(timeout=1)

    assert time.monotonic() - started < 3
    assert "dropping the oldest" in caplog.text
    assert "2 runner event(s) not sent" in caplog.text


@pytest.mark.parametrize("status", [401, 422])
def test_a_request_the_api_refuses_is_dropped_not_retried(monkeypatch, caplog, status):
    with api(status=status) as server:
        monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{server.server_port}/api")
        sender = EventSender()
        with caplog.at_level(logging.WARNING, logger="runner"):
            sender.send(event="runner.test", resource=RESOURCE)
            sender.close(timeout=10)

    assert len(server.posts) == 1
    assert f"HTTP {status}" in caplog.text
    assert "not sent" not in caplog.text
