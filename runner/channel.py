"""Worker-to-guard messages: JSON lines over an inherited pipe that survives exec."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any


class Sender:
    """The worker's end: one JSON object per line, written whole (messages are small)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def send(self, kind: str, **data: Any) -> None:
        line = json.dumps({"kind": kind, **data}, separators=(",", ":")) + "\n"
        # An OSError means the guard is gone: nothing is left to tell.
        with contextlib.suppress(OSError):
            os.write(self._fd, line.encode())


@dataclass
class Inbox:
    """The guard's end: accumulates what the worker said, as the guard reads it."""

    fd: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    _partial: bytes = b""

    def read_available(self) -> bool:
        """Read what is in the pipe now; False once the worker's end is closed."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return False
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for raw in lines:
            try:
                self.messages.append(json.loads(raw))
            except ValueError:
                continue  # a torn write from a dying worker; the exit status tells the rest
        return True

    def last(self, kind: str) -> dict[str, Any] | None:
        return next((m for m in reversed(self.messages) if m.get("kind") == kind), None)
