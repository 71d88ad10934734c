"""Which machine this is (cloud, region, instance id and type, spot), for the VM resource on
every event: DMI first (a file read, no network), then that cloud's instance metadata
service (AWS IMDSv2, GCE, Azure IMDS) with short timeouts."""

from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("runner")

DMI = Path("/sys/class/dmi/id")
_TIMEOUT = 1.0  # seconds per request: the metadata service is local or absent
_AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"


@dataclass(frozen=True)
class Machine:
    cloud: str  # aws | gcp | azure | unknown
    instance_id: str
    region: str = "unknown"
    instance_type: str = "unknown"
    spot: bool | None = None  # None: not known

    def resource(self) -> dict[str, str]:
        """The machine as a related event resource."""
        return {
            "prefect.resource.id": f"runner.vm.{self.instance_id}",
            "prefect.resource.role": "vm",
            "cloud": self.cloud,
            "region": self.region,
            "instance-type": self.instance_type,
            "spot": "unknown" if self.spot is None else str(self.spot).lower(),
        }


def detect(*, cloud: str, urls: dict[str, str], dmi: Path = DMI) -> Machine:
    """This machine; ``cloud`` "auto" asks DMI which cloud (if any) to query. Never
    raises: an unreachable or odd metadata service gives an ``unknown`` machine."""
    if cloud == "auto":
        cloud = cloud_from_dmi(dmi)
    try:
        if cloud == "aws":
            return _aws(urls["aws"])
        if cloud == "gcp":
            return _gcp(urls["gcp"])
        if cloud == "azure":
            return _azure(urls["azure"])
    except Exception as exc:  # metadata is a nicety: the run goes on without it
        log.info("instance metadata (%s) not available: %s", cloud, exc)
    return Machine(cloud="unknown", instance_id=socket.gethostname())


def cloud_from_dmi(dmi: Path = DMI) -> str:
    """aws, gcp or azure from the firmware's strings; "none" off-cloud (or unreadable)."""

    def read(name: str) -> str:
        try:
            return (dmi / name).read_text().strip()
        except OSError:
            return ""

    vendor = f"{read('sys_vendor')} {read('bios_vendor')} {read('product_name')}"
    if "Amazon EC2" in vendor or read("bios_vendor").startswith("Amazon"):
        return "aws"
    if "Google" in vendor:
        return "gcp"
    if "Microsoft Corporation" in vendor and read("chassis_asset_tag") == _AZURE_ASSET_TAG:
        return "azure"
    return "none"


def fetch(url: str, headers: dict[str, str], method: str = "GET") -> str:
    """The body of one request to a metadata service; raises ``urllib.error.HTTPError``
    (with its ``code``) for a non-2xx answer and ``OSError`` when there is no answer."""
    request = urllib.request.Request(url, headers=headers, method=method)
    # No proxy: the metadata service is link-local, and a proxy would answer for it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=_TIMEOUT) as response:
        return response.read().decode()


def aws_token(base: str, ttl_seconds: int = 60) -> str:
    """An IMDSv2 session token, sent as ``X-aws-ec2-metadata-token`` on every GET."""
    ttl = {"X-aws-ec2-metadata-token-ttl-seconds": str(ttl_seconds)}
    return fetch(f"{base}/latest/api/token", ttl, "PUT")


def _aws(base: str) -> Machine:
    token = aws_token(base)
    headers = {"X-aws-ec2-metadata-token": token}

    def meta(path: str) -> str:
        return fetch(f"{base}/latest/meta-data/{path}", headers)

    return Machine(
        cloud="aws",
        instance_id=meta("instance-id"),
        region=meta("placement/region"),
        instance_type=meta("instance-type"),
        spot=meta("instance-life-cycle") == "spot",
    )


def _gcp(base: str) -> Machine:
    headers = {"Metadata-Flavor": "Google"}

    def meta(path: str) -> str:
        return fetch(f"{base}/computeMetadata/v1/instance/{path}", headers)

    zone = meta("zone").rsplit("/", 1)[-1]  # projects/123/zones/us-central1-a
    model = meta("scheduling/provisioning-model")  # STANDARD | SPOT
    preemptible = meta("scheduling/preemptible")  # TRUE | FALSE
    return Machine(
        cloud="gcp",
        instance_id=meta("id"),
        region=zone.rsplit("-", 1)[0],
        instance_type=meta("machine-type").rsplit("/", 1)[-1],
        spot=model.upper() == "SPOT" or preemptible.upper() == "TRUE",
    )


def _azure(base: str) -> Machine:
    document: dict[str, Any] = json.loads(
        fetch(f"{base}/metadata/instance?api-version=2021-02-01", {"Metadata": "true"})
    )
    compute = document["compute"]
    return Machine(
        cloud="azure",
        instance_id=compute["vmId"],
        region=compute["location"],
        instance_type=compute["vmSize"],
        spot=compute.get("priority", "").lower() in ("spot", "low"),
    )


class Detection:
    """``detect`` in a background thread (started after the fork: the worker never
    inherits a thread), so that metadata requests never hold up the run."""

    def __init__(self, *, cloud: str, urls: dict[str, str]) -> None:
        self._machine: Machine | None = None
        self._thread = threading.Thread(
            target=self._run, args=(cloud, urls), name="runner-metadata", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def result(self, timeout: float = 3.0) -> Machine | None:
        """The machine, waiting up to ``timeout`` s for it; None if still unknown."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return self._machine

    def _run(self, cloud: str, urls: dict[str, str]) -> None:
        self._machine = detect(cloud=cloud, urls=urls)
