"""A Prefect server that writes one JSON line per request it serves (method, route, status,
bytes each way, time in the server, the client's kind), for bench/fleet.py's per-runner
figures. The same app as ``prefect server start`` (services included), in one process.

    python -m devtools.metered_server --record FILE --host 127.0.0.1 --port 4200

A websocket is one line, written when it closes: its lifetime, and the bytes of its
messages.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TextIO

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def route(path: str) -> str:
    """``/api/flow_runs/<uuid>/set_state`` → ``/flow_runs/{id}/set_state``."""
    return _UUID.sub("{id}", path.removeprefix("/api"))


def client_kind(headers: list[tuple[bytes, bytes]]) -> str:
    """Who asked, by User-Agent: ``runner`` (the runner's own REST calls,
    runner/prefect_rest.py), ``prefect`` (Prefect's client: the flow engine, ``flow-run
    execute``), ``websocket`` (the cancel watch, Prefect's events client), ``bench``
    (bench/fleet.py's own checks), or what the agent's first word is."""
    agent = dict(headers).get(b"user-agent", b"").decode(errors="replace").lower()
    if "websockets" in agent:
        return "websocket"
    for prefix, kind in (("prefect-vm-runner/", "runner"), ("prefect/", "prefect")):
        if agent.startswith(prefix):
            return kind
    return agent.split("/", 1)[0] or "other"


class Recorder:
    """ASGI middleware: one line per HTTP request or websocket into ``out``."""

    def __init__(self, app: ASGIApp, out: TextIO) -> None:
        self.app = app
        self.out = out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        record = {
            "t": time.time(),
            "method": scope.get("method", "WS"),
            "route": route(scope["path"]),
            "kind": client_kind(scope.get("headers", [])),
            "status": 0,
            "in": 0,
            "out": 0,
        }
        started = time.perf_counter()

        async def counted_receive() -> Message:
            message = await receive()
            record["in"] += _size(message)
            return message

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
            elif message["type"] == "websocket.accept":
                record["status"] = 101
            record["out"] += _size(message)
            await send(message)

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            record["ms"] = round(1000 * (time.perf_counter() - started), 2)
            self.out.write(json.dumps(record) + "\n")


def _size(message: Message) -> int:
    body = message.get("body") or message.get("bytes") or message.get("text") or b""
    return len(body.encode() if isinstance(body, str) else body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--record", required=True, help="JSON lines file, appended to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    import uvicorn
    from prefect.server.api.server import create_app

    with open(args.record, "a", buffering=1) as out:  # a line at a time: read while it runs
        uvicorn.run(
            Recorder(create_app(final=True), out),
            host=args.host,
            port=args.port,
            log_level="warning",
        )


if __name__ == "__main__":
    main()
