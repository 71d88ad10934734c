"""Worker-to-guard messages: JSON lines over a pipe the worker inherits from the guard."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any


class Sender:
    """The worker's end: one JSON object per line, written whole (messages are small)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd  # -1: no guard to tell (a container without a passed descriptor)

    def send(self, kind: str, **data: Any) -> None:
        line = json.dumps({"kind": kind, **data}, separators=(",", ":")) + "\n"
        # An OSError means the guard is gone: nothing is left to tell.
        with contextlib.suppress(OSError):
            os.write(self.fd, line.encode())


@dataclass
class Inbox:
    """The guard's end: accumulates what the worker said, as the guard reads it."""

    fd: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    _partial: bytes = b""

    def drain(self) -> bool:
        """Read everything in the (non-blocking) pipe now; False once its write end is
        closed. Never waits: a grandchild of the worker may hold the write end open."""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            for raw in lines:
                try:
                    self.messages.append(json.loads(raw))
                except ValueError:
                    continue  # a torn write from a dying worker; the exit status tells the rest

    def last(self, kind: str) -> dict[str, Any] | None:
        return next((m for m in reversed(self.messages) if m.get("kind") == kind), None)
