"""A loopback stand-in for the clouds' instance metadata services (AWS IMDSv2 with its token,
GCE with ``Metadata-Flavor: Google``, Azure IMDS with ``Metadata: true``), each refusing
requests without its header, as the real ones do; ``preempt(cloud)`` posts that cloud's
spot/preemption notice where the real service does."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
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
AZURE = {"compute": {"vmId": "02aab8a4-74ef-476e", "name": "runner-vm-1",
                     "location": "westeurope", "vmSize": "Standard_D4s_v5",
                     "priority": "Spot"}}  # fmt: skip
# Azure Scheduled Events: only Preempt is a spot eviction; the others are maintenance.
AZURE_EVENT_TYPES = ("Preempt", "Freeze", "Reboot", "Redeploy", "Terminate")


class MetadataServer:
    """``with MetadataServer() as imds: imds.url`` serves all three protocols."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.token = TOKEN  # the IMDSv2 token the service accepts now
        self.aws_instance_action: dict[str, str] | None = None  # None: 404, no notice
        self.gcp_preempted = False
        self.azure_events: dict[str, Any] = {"DocumentIncarnation": 1, "Events": []}
        self._lock = threading.Lock()
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

    def preempt(self, cloud: str) -> None:
        """From now on ``cloud`` (aws | gcp | azure) tells of a spot interruption, as the
        real service does about two minutes (AWS) or 30 seconds (GCE, Azure) ahead."""
        if cloud == "aws":
            at = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(minutes=2)
            self.aws_instance_action = {"action": "terminate", "time": _iso(at)}
        elif cloud == "gcp":
            self.gcp_preempted = True
        elif cloud == "azure":
            self.schedule_azure_event("Preempt")
        else:
            raise ValueError(f"no such cloud: {cloud!r}")

    def schedule_azure_event(self, event_type: str, resources: list[str] | None = None) -> str:
        """Post an Azure Scheduled Event (default: for this VM); returns its EventId."""
        if event_type not in AZURE_EVENT_TYPES:
            raise ValueError(f"no such Azure event type: {event_type!r}")
        event_id = str(uuid.uuid4()).upper()
        not_before = datetime.now(timezone.utc) + timedelta(seconds=30)
        event = {
            "EventId": event_id,
            "EventType": event_type,
            "ResourceType": "VirtualMachine",
            "Resources": resources if resources is not None else [AZURE["compute"]["name"]],
            "EventStatus": "Scheduled",
            "NotBefore": format_datetime(not_before.replace(microsecond=0), usegmt=True),
            "Description": _AZURE_DESCRIPTIONS[event_type],
            "EventSource": "Platform",
            "DurationInSeconds": 5 if event_type == "Freeze" else -1,
        }
        with self._lock:
            self.azure_events = {
                "DocumentIncarnation": self.azure_events["DocumentIncarnation"] + 1,
                "Events": [*self.azure_events["Events"], event],
            }
        return event_id

    def expire_token(self) -> None:
        """Tokens handed out so far are refused (401) from now on, as after their TTL."""
        self.token = f"{TOKEN}-{uuid.uuid4().hex[:8]}"


_AZURE_DESCRIPTIONS = {
    "Preempt": "Virtual machine is being preempted.",
    "Freeze": "Host server is undergoing maintenance.",
    "Reboot": "Virtual machine is going to be restarted as requested by authorized user.",
    "Redeploy": "Virtual machine is being moved to another host.",
    "Terminate": "Virtual machine is being deleted.",
}


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _handler(server: MetadataServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_PUT(self) -> None:
            server.requests.append(("PUT", self.path))
            if self.path == "/latest/api/token" and self.headers.get(
                "X-aws-ec2-metadata-token-ttl-seconds"
            ):
                return self._answer(200, server.token)
            self._answer(400, "")

        def do_GET(self) -> None:
            server.requests.append(("GET", self.path))
            path = self.path.split("?", 1)[0]
            if path.startswith("/latest/meta-data/"):
                if self.headers.get("X-aws-ec2-metadata-token") != server.token:
                    return self._answer(401, "")
                name = path.removeprefix("/latest/meta-data/")
                if name == "spot/instance-action":  # 404 until there is a notice
                    action = server.aws_instance_action
                    return self._value(json.dumps(action) if action else None)
                return self._value(AWS.get(name))
            if path.startswith("/computeMetadata/v1/instance/"):
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self._answer(403, "")
                name = path.removeprefix("/computeMetadata/v1/instance/")
                if name == "preempted":
                    return self._answer(200, "TRUE" if server.gcp_preempted else "FALSE")
                return self._value(GCP.get(name))
            if path in ("/metadata/instance", "/metadata/scheduledevents"):
                if self.headers.get("Metadata") != "true" or "api-version" not in self.path:
                    return self._answer(400, "")
                if path == "/metadata/scheduledevents":
                    with server._lock:
                        return self._answer(200, json.dumps(server.azure_events))
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
