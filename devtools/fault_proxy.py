"""A loopback HTTP proxy in front of a real server (moto, a Prefect server) that forwards
every request except those a rule answers itself: a cloud's capacity error, a 500. Faults
injected at the HTTP level, so the SDK under test parses a real error response.

    with FaultProxy(moto.url) as proxy:
        proxy.answer(lambda r: b"InstanceType=m6i.large" in r.body, 500, ec2_error(...))
        boto3.client("ec2", endpoint_url=proxy.url)...

A rule answers every match, the first ``times`` of them, or every ``every``-th (throttling
spread over a fleet's requests); ``answer`` returns it, and its ``hits`` count what it
answered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

import httpx

from devtools.server_process import HOST

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased


@dataclass
class Rule:
    match: Callable[[Request], bool]
    status: int
    body: bytes
    content_type: str
    times: int | None  # None: every match
    hits: int = 0  # requests answered
    every: int = 1  # answer the every-th match only (the k-th, 2k-th, ...)
    matched: int = 0  # requests matched, answered or not
    forward: bool = False  # the server gets the request first: only its answer is lost

    def takes(self, request: Request) -> bool:
        """Whether this rule answers ``request`` (counting it); under the proxy's lock."""
        if self.times is not None and self.hits >= self.times:
            return False
        if not self.match(request):
            return False
        self.matched += 1
        if self.matched % self.every:
            return False
        self.hits += 1
        return True


@dataclass
class FaultProxy:
    upstream: str
    requests: list[Request] = field(default_factory=list)
    _rules: list[Rule] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._client = httpx.Client(base_url=self.upstream, timeout=60)
        self._server = ThreadingHTTPServer((HOST, 0), self._handler())
        self.url = f"http://{HOST}:{self._server.server_address[1]}"

    def answer(
        self,
        match: Callable[[Request], bool],
        status: int,
        body: bytes,
        *,
        content_type: str = "text/xml",
        times: int | None = None,
        every: int = 1,
        forward: bool = False,
    ) -> Rule:
        """Requests for which ``match`` is true get this answer instead of the server's
        (the first ``times`` of them; all, by default; with ``every=k`` only the k-th,
        2k-th... match, the others going on to the next rule or the server). Rules are
        tried in the order they were added. Returns the rule: ``rule.hits`` counts the
        requests it answered. With ``forward`` the request still reaches the server (which
        acts on it), and only its answer is replaced: a 500 after the work was done."""
        if every < 1:
            raise ValueError(f"every must be 1 or more, not {every}")
        rule = Rule(match, status, body, content_type, times, every=every, forward=forward)
        with self._lock:
            self._rules.append(rule)
        return rule

    def _rule_for(self, request: Request) -> Rule | None:
        with self._lock:
            self.requests.append(request)
            for rule in self._rules:
                if rule.takes(request):
                    return rule
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                request = Request(self.command, self.path, body, headers)
                rule = proxy._rule_for(request)
                if rule is not None and not rule.forward:
                    self._reply(rule.status, {"Content-Type": rule.content_type}, rule.body)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                upstream = proxy._client.request(
                    self.command, self.path, headers=headers, content=body
                )
                if rule is not None:  # forwarded: the server acted, its answer is lost
                    self._reply(rule.status, {"Content-Type": rule.content_type}, rule.body)
                    return
                kept = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
                kept.pop("content-encoding", None)  # httpx decoded it
                self._reply(upstream.status_code, kept, upstream.content)

            def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

        return Handler

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()


def ec2_error(code: str, message: str) -> bytes:
    """An EC2 (query API) error response, as botocore parses it."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error>"
        "</Errors><RequestID>fault-proxy</RequestID></Response>"
    ).encode()


def ec2_action(*actions: str) -> Callable[[Request], bool]:
    """A ``match`` for EC2 (query API) requests of these actions: ``ec2_action("RunInstances")``."""
    wanted = {f"Action={action}".encode() for action in actions}

    def match(request: Request) -> bool:
        return any(part in wanted for part in request.body.split(b"&"))

    return match
