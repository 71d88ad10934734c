"""The worker↔guard protocol, written down once: the worker's messages (JSON lines over a
pipe it inherits from the guard, or is passed into a container) and the signals by which
the guard asks it to stop.

The JSON stays what it has always been (``{"kind": ..., fields...}``), so a worker in a
container image built with another release of the runner still talks to this guard; a
kind this guard does not know is skipped."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypeVar


@dataclass(frozen=True)
class Claimed:
    """The worker claimed the run: the run as an event resource, and its run count then."""

    kind: ClassVar[str] = "claimed"
    resource: dict[str, str] = field(default_factory=dict)
    related: list[dict[str, str]] = field(default_factory=list)
    run_count: int = 0


@dataclass(frozen=True)
class Phase:
    """A step of the run is done (code-pulled, env-ready, flow-started, flow-finished), with
    its figures (seconds, cache_hit, bytes_downloaded, environment, state...)."""

    kind: ClassVar[str] = "phase"
    name: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Container:
    """The flow runs in this container: the guard removes it if its CLI is killed."""

    kind: ClassVar[str] = "container"
    cli: str
    name: str


@dataclass(frozen=True)
class Error:
    """The worker stopped on an error before the flow reported a state: its one line."""

    kind: ClassVar[str] = "error"
    message: str
    exit_code: int


@dataclass(frozen=True)
class Finished:
    """The engine reported the run's final state."""

    kind: ClassVar[str] = "finished"
    state: str  # the state type: COMPLETED, FAILED, CANCELLED, CRASHED
    name: str
    message: str | None = None


Message = Claimed | Phase | Container | Error | Finished
_KINDS: dict[str, type[Message]] = {m.kind: m for m in (Claimed, Phase, Container, Error, Finished)}
M = TypeVar("M", Claimed, Phase, Container, Error, Finished)

# How the guard asks the worker to stop, by reason; the worker's flow stage tells the
# engine the matching intent before it stops it (stage._stop_with_intent).
#   cancel       SIGUSR1: the engine runs the flow's on_cancellation hooks, ends Cancelled
#   preemption   SIGUSR2: the engine stops without a state; the guard proposes the next
#   max-runtime  SIGUSR2  one (AwaitingRetry, or Crashed with the reason)
#   interrupt    SIGINT:  stopped as any process is (the engine ends the run Crashed)
STOP_SIGNALS: dict[str, signal.Signals] = {
    "cancel": signal.SIGUSR1,
    "preemption": signal.SIGUSR2,
    "max-runtime": signal.SIGUSR2,
    "interrupt": signal.SIGINT,
}
ENGINE_INTENTS: dict[signal.Signals, str] = {
    signal.SIGUSR1: "cancel",
    signal.SIGUSR2: "relinquish",
}


def encode(message: Message) -> bytes:
    if isinstance(message, Phase):
        data = {"kind": message.kind, "name": message.name, **message.details}
    else:
        data = {"kind": message.kind, **asdict(message)}
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


def decode(data: dict[str, Any]) -> Message | None:
    """The message of one JSON object; None for a kind this guard doesn't know (or one
    without its fields). Fields it doesn't know are left out: a newer worker's additions."""
    values = dict(data)
    cls = _KINDS.get(values.pop("kind", None))
    if cls is None:
        return None
    try:
        if cls is Phase:
            return Phase(name=values.pop("name"), details=values)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in known})
    except (KeyError, TypeError):
        return None


class Sender:
    """The worker's end: one JSON object per line, written whole (messages are small)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd  # -1: no guard to tell (a container without a passed descriptor)

    def send(self, message: Message) -> None:
        # An OSError means the guard is gone: nothing is left to tell.
        with contextlib.suppress(OSError):
            os.write(self.fd, encode(message))


@dataclass
class Inbox:
    """The guard's end: accumulates what the worker said, as the guard reads it."""

    fd: int
    messages: list[Message] = field(default_factory=list)
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
                    message = decode(json.loads(raw))
                except (ValueError, TypeError):
                    continue  # a torn write from a dying worker; the exit status tells the rest
                if message is not None:
                    self.messages.append(message)

    def last(self, kind: type[M]) -> M | None:
        return next((m for m in reversed(self.messages) if isinstance(m, kind)), None)
