"""A loopback stand-in for the clouds' instance metadata services (AWS IMDSv2 with its token,
GCE with ``Metadata-Flavor: Google``, Azure IMDS with ``Metadata: true``), each refusing
requests without its header, as the real ones do."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from devtools.server_process import HOST

TOKEN = "imds-test-token"
AWS = {
    "instance-id": "i-0abc123def4567890",
    "placement/region": "eu-west-1",
    "instance-type": "m6i.large",
    "instance-life-cycle": "spot",
}
# What the runner should make of AWS above, as the related resource on its events.
AWS_RESOURCE = {
    "prefect.resource.id": f"runner.vm.{AWS['instance-id']}",
    "prefect.resource.role": "vm",
    "cloud": "aws",
    "region": "eu-west-1",
    "instance-type": "m6i.large",
    "spot": "true",
}
GCP = {
    "id": "4520935512138873457",
    "zone": "projects/123/zones/us-central1-a",
    "machine-type": "projects/123/machineTypes/n2-standard-4",
    "scheduling/provisioning-model": "STANDARD",
    "scheduling/preemptible": "FALSE",
}
AZURE = {"compute": {"vmId": "02aab8a4-74ef-476e", "location": "westeurope",
                     "vmSize": "Standard_D4s_v5", "priority": "Spot"}}  # fmt: skip


class MetadataServer:
    """``with MetadataServer() as imds: imds.url`` serves all three protocols."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self._httpd = ThreadingHTTPServer((HOST, 0), _handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://{HOST}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> MetadataServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler(server: MetadataServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_PUT(self) -> None:
            server.requests.append(("PUT", self.path))
            if self.path == "/latest/api/token" and self.headers.get(
                "X-aws-ec2-metadata-token-ttl-seconds"
            ):
                return self._answer(200, TOKEN)
            self._answer(400, "")

        def do_GET(self) -> None:
            server.requests.append(("GET", self.path))
            path = self.path.split("?", 1)[0]
            if path.startswith("/latest/meta-data/"):
                if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                    return self._answer(401, "")
                return self._value(AWS.get(path.removeprefix("/latest/meta-data/")))
            if path.startswith("/computeMetadata/v1/instance/"):
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self._answer(403, "")
                return self._value(GCP.get(path.removeprefix("/computeMetadata/v1/instance/")))
            if path == "/metadata/instance":
                if self.headers.get("Metadata") != "true" or "api-version" not in self.path:
                    return self._answer(400, "")
                return self._answer(200, json.dumps(AZURE))
            self._answer(404, "")

        def _value(self, value: str | None) -> None:
            self._answer(200, value) if value is not None else self._answer(404, "")

        def _answer(self, status: int, body: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
