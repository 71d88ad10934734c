"""Notice that the flow run was asked to cancel: Prefect's events websocket tells at once,
and a poll of the run's state is the fallback; ``on_cancel`` is called once, from a thread,
so the guard's own loop never waits on the network.

While the websocket is subscribed the poll slows down to one in ``_POLL_SLOWDOWN``: the
websocket already tells within a second, and on a fleet the poll was the runner's most
frequent request (6 a minute per VM, bench/fleet.py). It still runs, rarely, in case the
server's events stall while the socket stays open; once the socket drops it is back to
every ``poll_seconds``."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import httpx

from runner.prefect_rest import RunApi, connection, websocket_token
from runner.retry import Backoff

log = logging.getLogger("runner")

CANCELLING = "prefect.flow-run.Cancelling"
# Between two tries to open the websocket: 1 s, doubling up to 30 s (the poll goes on).
_RECONNECT = Backoff(first=1.0, most=30.0)
# While the websocket is subscribed, one poll in this many (one a minute at the default 10 s).
_POLL_SLOWDOWN = 6


class CancelWatch:
    """``CancelWatch(id, poll_seconds=10, on_cancel=...)``; ``start()``, ``stop()``."""

    def __init__(
        self, flow_run_id: uuid.UUID, *, poll_seconds: float, on_cancel: Callable[[], None]
    ) -> None:
        self._flow_run_id = flow_run_id
        self._poll_seconds = poll_seconds
        self._on_cancel = on_cancel
        self._stopping = threading.Event()
        self._fired = False
        self._lock = threading.Lock()
        self._socket: object | None = None  # the open websocket, closed by stop()
        self._subscribed = threading.Event()  # the websocket is listening for the cancel
        self._threads = [
            threading.Thread(target=self._listen, name="runner-cancel-events", daemon=True),
            threading.Thread(target=self._poll, name="runner-cancel-poll", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            socket = self._socket
        if socket is not None:
            socket.close()  # type: ignore[attr-defined]  # ends the blocking receive

    def _fire(self, seen_by: str) -> None:
        with self._lock:
            if self._fired or self._stopping.is_set():
                return
            self._fired = True
        log.info("flow run %s is Cancelling (seen by %s)", self._flow_run_id, seen_by)
        self._on_cancel()

    def _listen(self) -> None:
        """Subscribe to the run's Cancelling event; reconnect with backoff until stopped."""
        from websockets.sync.client import connect

        url, _ = connection()
        events_url = "ws" + url.removeprefix("http") + "/events/out"
        now = datetime.now(timezone.utc)
        subscription = {
            "type": "filter",
            "backfill": True,  # a cancel between the claim and this subscription counts
            "filter": {
                "event": {"name": [CANCELLING]},
                "any_resource": {"id": [f"prefect.flow-run.{self._flow_run_id}"]},
                # `until` defaults to the subscription's own time, which would leave out
                # every event still to come.
                "occurred": {
                    "since": (now - timedelta(minutes=10)).isoformat(),
                    "until": (now + timedelta(days=366)).isoformat(),
                },
            },
        }
        delays = _RECONNECT.delays()
        while not self._stopping.is_set():
            try:
                with connect(events_url, subprotocols=["prefect"], open_timeout=10) as socket:
                    with self._lock:
                        self._socket = socket
                    if self._stopping.is_set():
                        return
                    socket.send(json.dumps({"type": "auth", "token": websocket_token()}))
                    reply = json.loads(socket.recv(timeout=10))
                    if reply.get("type") != "auth_success":
                        log.info("events websocket refused the subscription: %s", reply)
                        return  # polling carries on
                    socket.send(json.dumps(subscription))
                    self._subscribed.set()
                    delays = _RECONNECT.delays()  # connected: the next drop starts over
                    for message in socket:
                        data = json.loads(message)
                        if data.get("type") == "event" and data["event"]["event"] == CANCELLING:
                            self._fire("events websocket")
                            return
            except Exception as exc:  # dropped or unreachable: the poll still runs
                if self._stopping.is_set():
                    return
                log.debug("events websocket: %s; reconnecting", exc)
            finally:
                self._subscribed.clear()
                with self._lock:
                    self._socket = None
            self._stopping.wait(next(delays))

    def _poll(self) -> None:
        if self._poll_seconds <= 0:
            return
        timeout = httpx.Timeout(min(10.0, self._poll_seconds), connect=5.0)
        skipped = 0
        with RunApi(self._flow_run_id, api_wait=0, timeout=timeout) as api:
            while not self._stopping.wait(self._poll_seconds):
                if self._subscribed.is_set() and skipped < _POLL_SLOWDOWN - 1:
                    skipped += 1
                    continue
                skipped = 0
                try:
                    state = api.state(retry_busy=False).get("type")
                except Exception as exc:  # the API is down for a while: ask again later
                    log.debug("polling the flow run's state: %s", exc)
                    continue
                if state == "CANCELLING":
                    self._fire("state poll")
                    return
