"""The cancel watch's fallback: a poll of the run's state, where the API has no events
websocket (a loopback HTTP server that answers the one request the poll makes)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from runner.cancellation import CancelWatch


def test_the_poll_sees_cancelling_where_there_is_no_websocket(monkeypatch):
    run_id = uuid.uuid4()
    polls: list[str] = []

    class Api(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path != f"/api/flow_runs/{run_id}":  # the websocket upgrade too
                self.send_error(404)
                return
            polls.append(self.path)
            state = "CANCELLING" if len(polls) >= 3 else "RUNNING"
            body = json.dumps({"id": str(run_id), "state": {"type": state}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{server.server_port}/api")
    fired = threading.Event()
    watch = CancelWatch(run_id, poll_seconds=0.2, on_cancel=fired.set)
    try:
        watch.start()
        assert fired.wait(10)
        assert len(polls) == 3  # RUNNING twice, then CANCELLING
        time.sleep(0.6)
        assert len(polls) == 3  # and no poll after it
    finally:
        watch.stop()
        server.shutdown()
