"""A loopback stand-in for the few Compute Engine endpoints the gcp provider and the gcp
catalog use (instances, zone operations, disks, machine types, images, regions), for Compute
Engine's SKUs in the Cloud Billing Catalog API, and for the metadata server's token, strict
about auth headers and request shapes as the real ones are.

    with GceApi() as gce:
        subprocess.run(..., env={**os.environ, **gce.env()})  # the real SDK, pointed here
        gce.exhaust("n2-standard-2", "SPOT")  # inserts of that type on spot fail
        gce.metadata(name)["prefect-vm-runner-env"]; gce.power_off(name)
        gce.add_sku("N2 Instance Core running in Americas", ["us-central1"], 0.031611, "h")

It speaks REST JSON as ``compute.googleapis.com/compute/v1`` does (operations that end
``DONE``, errors as ``{"error": {"code", "message", "errors": [{"reason"...}]}}``), and the
metadata server's ``/computeMetadata/v1/`` as google-auth reads it on a GCE VM: the SDK
gets its bearer token from there, and every API call must carry that token. The billing
API's ``GET /v1/services/6F81-5844-456A/skus`` answers as cloudbilling.googleapis.com does
(SKU documents, ``nextPageToken`` pages, errors as ``{"error": {"code", "message",
"status"}}``), with a realistic few of Compute Engine's SKUs (``SKUS``): the on-demand
ones of e2, t2a and g2 in us-central1, and decoys a price reader must not take (spot,
commitments, custom, sole-tenant, other regions, other resources).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from devtools.server_process import HOST

TOKEN = "test-token"
PROJECT = "test-project"
ZONE = "us-central1-a"
SERVICE_ACCOUNT = f"worker@{PROJECT}.iam.gserviceaccount.com"
LINK = "https://www.googleapis.com/compute/v1/"  # what GCE's selfLinks start with
# machine type -> (vCPUs, memory MiB)
MACHINE_TYPES = {
    "e2-standard-2": (2, 8192),
    "e2-standard-4": (4, 16384),
    "n2-standard-2": (2, 8192),
    "n2-standard-4": (4, 16384),
    "g2-standard-4": (4, 16384),
    "t2a-standard-2": (2, 8192),
}
# machine type -> its accelerators (type, count); and the Arm ones (the rest are X86_64)
ACCELERATORS = {"g2-standard-4": [("nvidia-l4", 1)]}
ARM64 = {"t2a-standard-2"}
# (project, image) -> (family, minimum disk GiB)
IMAGES = {
    (PROJECT, "prefect-vm-runner-20240601"): ("prefect-vm-runner", 10),
    ("debian-cloud", "debian-12-bookworm-v20240611"): ("debian-12", 10),
}
DISK_TYPES = {"pd-balanced", "pd-standard", "pd-ssd"}
CAPACITY_MESSAGE = (
    "The zone 'projects/{project}/zones/{zone}' does not have enough resources available "
    "to fulfill the request.  Try a different zone, or try again later."
)

# Compute Engine's service in the Cloud Billing Catalog, and its SKUs here: (description,
# serviceRegions, USD per usage unit, usageUnit, usageType). Descriptions and shapes as the
# API lists them (hail-is/hail's and opencost's readers of it); us-central1 is "Iowa" for
# the newer families, inside "Americas" for e2.
BILLING_SERVICE = "6F81-5844-456A"
_AMERICAS = ["us-central1", "us-east1", "us-west1"]
SKUS: list[tuple[str, list[str], float, str, str]] = [
    ("E2 Instance Core running in Americas", _AMERICAS, 0.021811, "h", "OnDemand"),
    ("E2 Instance Ram running in Americas", _AMERICAS, 0.002923, "GiBy.h", "OnDemand"),
    ("T2A Arm Instance Core running in Iowa", ["us-central1"], 0.02888, "h", "OnDemand"),
    ("T2A Arm Instance Ram running in Iowa", ["us-central1"], 0.00231, "GiBy.h", "OnDemand"),
    ("G2 Instance Core running in Iowa", ["us-central1"], 0.024988, "h", "OnDemand"),
    ("G2 Instance Ram running in Iowa", ["us-central1"], 0.002927, "GiBy.h", "OnDemand"),
    ("Nvidia L4 GPU running in Iowa", ["us-central1"], 0.560279, "h", "OnDemand"),
    # Decoys: the same words at other prices, for spot, commitments, custom and
    # sole-tenant machines, other regions; n2 has no on-demand price in us-central1 here.
    ("Spot Preemptible E2 Instance Core running in Americas", _AMERICAS, 0.006543, "h",
     "Preemptible"),
    ("Spot Preemptible E2 Instance Ram running in Americas", _AMERICAS, 0.000877, "GiBy.h",
     "Preemptible"),
    ("Commitment v1: E2 Cpu in Americas for 1 Year", _AMERICAS, 0.013741, "h", "Commit1Yr"),
    ("Commitment v1: E2 Ram in Americas for 1 Year", _AMERICAS, 0.001842, "GiBy.h",
     "Commit1Yr"),
    ("E2 Custom Instance Core running in Americas", _AMERICAS, 0.022904, "h", "OnDemand"),
    ("E2 Instance Core running in Virginia", ["us-east4"], 0.024559, "h", "OnDemand"),
    ("E2 Instance Ram running in Virginia", ["us-east4"], 0.003291, "GiBy.h", "OnDemand"),
    ("Spot Preemptible T2A Arm Instance Core running in Iowa", ["us-central1"], 0.00866, "h",
     "Preemptible"),
    ("Spot Preemptible G2 Instance Core running in Iowa", ["us-central1"], 0.00999, "h",
     "Preemptible"),
    ("Nvidia L4 GPU attached to Spot Preemptible VMs running in Iowa", ["us-central1"],
     0.2241, "h", "Preemptible"),
    ("G2 Instance Ram running in Virginia", ["us-east4"], 0.003296, "GiBy.h", "OnDemand"),
    ("N2 Custom Instance Core running in Americas", _AMERICAS, 0.033191, "h", "OnDemand"),
    ("N2 Sole Tenancy Instance Core running in Americas", _AMERICAS, 0.034773, "h",
     "OnDemand"),
    ("Spot Preemptible N2 Instance Core running in Americas", _AMERICAS, 0.00765, "h",
     "Preemptible"),
    ("Commitment v1: N2 Cpu in Americas for 1 Year", _AMERICAS, 0.019915, "h", "Commit1Yr"),
    ("N2 Instance Core running in Virginia", ["us-east4"], 0.035605, "h", "OnDemand"),
    ("N2 Instance Ram running in Virginia", ["us-east4"], 0.004772, "GiBy.h", "OnDemand"),
    ("Balanced PD Capacity in Iowa", ["us-central1"], 0.1, "GiBy.mo", "OnDemand"),
]  # fmt: skip
# usageUnit -> (usageUnitDescription, baseUnit, baseUnitDescription, baseUnitConversionFactor)
_UNITS = {
    "h": ("hour", "s", "second", 3600),
    "GiBy.h": ("gibibyte hour", "By.s", "byte second", 3865470566400),
    "GiBy.mo": ("gibibyte month", "By.s", "byte second", 2875910101401600),
}

_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
_METADATA_KEY = re.compile(r"[a-zA-Z0-9_-]{1,128}")
_FILTER = re.compile(r'labels\.([a-z][a-z0-9_-]{0,62}) = "([a-z0-9_-]{0,63})"')
_IMAGE = re.compile(
    r"(?:https://(?:www|compute)\.googleapis\.com/compute/v1/)?"
    r"projects/([^/]+)/global/images/(family/)?([^/]+)"
)

# What each part of an insert body may hold (more is a 400, as an unknown field is on GCE).
_INSTANCE_FIELDS = {
    "name", "machineType", "disks", "metadata", "labels", "scheduling", "networkInterfaces",
    "serviceAccounts",
}  # fmt: skip
_DISK_FIELDS = {"boot", "autoDelete", "initializeParams", "type", "mode"}
_INIT_FIELDS = {"sourceImage", "diskSizeGb", "diskName", "diskType"}
_SCHEDULING_FIELDS = {
    "provisioningModel", "instanceTerminationAction", "automaticRestart", "onHostMaintenance",
}  # fmt: skip
_NIC_FIELDS = {"network", "subnetwork", "accessConfigs"}


class ApiError(Exception):
    """Answered as a GCE error document."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    def document(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.status,
                "message": self.message,
                "errors": [{"message": self.message, "domain": "global", "reason": self.reason}],
            }
        }


class BillingError(ApiError):
    """Answered as the billing API's error document: a google.rpc status (``reason``
    here: NOT_FOUND, INVALID_ARGUMENT...), no "errors" list."""

    def document(self) -> dict[str, Any]:
        return {"error": {"code": self.status, "message": self.message, "status": self.reason}}


def _now() -> str:
    """GCE's timestamps: RFC 3339 with milliseconds and an offset."""
    moment = datetime.now(timezone.utc).astimezone()
    return moment.isoformat(timespec="milliseconds")


def _id() -> str:
    return str(secrets.randbelow(9 * 10**18) + 10**18)


class GceApi:
    """The stand-in, its state (instances, disks, operations), and what tests do to it."""

    def __init__(self, *, project: str = PROJECT, zone: str = ZONE, token: str = TOKEN) -> None:
        self.project, self.zone, self.token = project, zone, token
        self.requests: list[tuple[str, str]] = []  # (method, path) of each API call
        self.page_size = 500
        self.sku_page_size = 5  # the billing API's pages here (5000 at most on Google's)
        self.revoked = False
        self._skus = [_sku(*sku) for sku in SKUS]
        self._sku_pages: dict[str, int] = {}  # nextPageToken -> where its page starts
        self._instances: dict[str, dict[str, Any]] = {}
        self._disks: dict[str, dict[str, Any]] = {}
        self._operations: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, Callable[[], None]] = {}  # operation -> what ends it
        self._consoles: dict[str, str] = {}
        self._exhausted: dict[tuple[str, str | None], str] = {}
        self._lock = threading.RLock()
        self._httpd = ThreadingHTTPServer((HOST, 0), _handler(self))
        self._httpd.daemon_threads = True
        self.host = f"{HOST}:{self._httpd.server_address[1]}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        # No gcloud login of this machine's user may leak into the SDK under test.
        self._gcloud_config = tempfile.mkdtemp(prefix="gce-api-gcloud-")

    def __enter__(self) -> GceApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        shutil.rmtree(self._gcloud_config, ignore_errors=True)

    def env(self) -> dict[str, str]:
        """For a process whose SDK should use this: the API endpoint as gcloud's override
        names it, the metadata server (google-auth's credentials on a GCE VM), and no
        other credentials."""
        return {
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE": f"{self.url}/compute/v1/",
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDBILLING": f"{self.url}/",
            "GCE_METADATA_HOST": self.host,
            "GCE_METADATA_IP": self.host,
            "GOOGLE_APPLICATION_CREDENTIALS": "",
            "CLOUDSDK_CONFIG": self._gcloud_config,
        }

    # What tests do: faults, the VM's own doings, and reading the state back.

    def exhaust(
        self, machine_type: str, provisioning_model: str | None = None, *, via: str = "operation"
    ) -> None:
        """Inserts of ``machine_type`` (on ``SPOT`` or ``STANDARD``; None: both) fail with
        ZONE_RESOURCE_POOL_EXHAUSTED: in the insert's operation, as GCE mostly says it
        (``via="operation"``), or as the insert's own HTTP 503 (``via="http"``)."""
        if via not in ("operation", "http"):
            raise ValueError(f"via is operation or http, not {via!r}")
        with self._lock:
            self._exhausted[(machine_type, provisioning_model)] = via

    def add_sku(
        self,
        description: str,
        regions: list[str],
        usd: float,
        unit: str,
        usage_type: str = "OnDemand",
    ) -> dict[str, Any]:
        """Another SKU of Compute Engine, listed after the others."""
        with self._lock:
            self._skus.append(_sku(description, regions, usd, unit, usage_type))
            return self._skus[-1]

    def revoke_token(self) -> None:
        """The APIs refuse the token the metadata server still hands out (its service
        account disabled, say)."""
        with self._lock:
            self.revoked = True

    def power_off(self, name: str) -> None:
        """What the guest's poweroff does on GCE: the instance is TERMINATED (stopped),
        its disks kept (and billed)."""
        with self._lock:
            self._instances[name]["status"] = "TERMINATED"
            self._instances[name]["lastStopTimestamp"] = _now()

    def print_console(self, name: str, text: str) -> None:
        with self._lock:
            self._consoles[name] = self._consoles.get(name, "") + text

    def instance(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._instances.get(name)
            return json.loads(json.dumps(found)) if found else None

    def instances(self, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """Every instance (carrying ``labels``), in any state."""
        with self._lock:
            found = [
                json.loads(json.dumps(instance))
                for instance in self._instances.values()
                if (labels or {}).items() <= instance.get("labels", {}).items()
            ]
        return sorted(found, key=lambda instance: instance["name"])

    def disks(self) -> list[str]:
        with self._lock:
            return sorted(self._disks)

    def metadata(self, name: str) -> dict[str, str]:
        with self._lock:
            items = self._instances[name].get("metadata", {}).get("items", [])
            return {item["key"]: item.get("value", "") for item in items}

    def add_instance(
        self,
        name: str,
        *,
        machine_type: str = "n2-standard-2",
        labels: Mapping[str, str] | None = None,
        status: str = "RUNNING",
        auto_delete: bool = True,
    ) -> dict[str, Any]:
        """An instance made elsewhere (by a worker that died, by hand), with its boot disk."""
        image = next(iter(IMAGES))
        body = {
            "name": name,
            "machineType": f"zones/{self.zone}/machineTypes/{machine_type}",
            "disks": [{"boot": True, "autoDelete": auto_delete,
                       "initializeParams": {"sourceImage": _image_path(*image)}}],
            "networkInterfaces": [{"network": "global/networks/default"}],
            "labels": dict(labels or {}),
        }  # fmt: skip
        with self._lock:
            self._check_instance(body)
            instance = self._create(body)
            instance["status"] = status
            return json.loads(json.dumps(instance))

    def add_disk(self, name: str) -> None:
        """A disk that outlived its instance (one made with autoDelete off)."""
        with self._lock:
            self._disks[name] = self._disk(name, next(iter(IMAGES)), 10)

    # The API, as the handler calls it (under the lock).

    def _link(self, path: str) -> str:
        return f"{LINK}projects/{self.project}/{path}"

    def _zone_path(self, project: str, zone: str) -> None:
        if project != self.project:
            raise ApiError(404, "notFound", f"The resource 'projects/{project}' was not found")
        if zone != self.zone:
            raise ApiError(
                404, "notFound", f"The resource 'projects/{project}/zones/{zone}' was not found"
            )

    def insert(self, body: Any) -> dict[str, Any]:
        self._check_instance(body)
        name = body["name"]
        if name in self._instances:
            raise ApiError(
                409,
                "alreadyExists",
                f"The resource 'projects/{self.project}/zones/{self.zone}/instances/{name}' "
                "already exists",
            )
        machine_type = _last(body["machineType"])
        model = body.get("scheduling", {}).get("provisioningModel", "STANDARD")
        via = self._exhausted.get((machine_type, model)) or self._exhausted.get(
            (machine_type, None)
        )
        message = CAPACITY_MESSAGE.format(project=self.project, zone=self.zone)
        if via == "http":
            raise ApiError(503, "ZONE_RESOURCE_POOL_EXHAUSTED", message)
        target = self._link(f"zones/{self.zone}/instances/{name}")
        if via == "operation":  # accepted, then the operation ends in the error
            operation = self._operation("insert", target, "RUNNING")
            error = {"errors": [{"code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": message}]}
            self._pending[operation["name"]] = lambda: operation.update(
                error=error, httpErrorStatusCode=503, httpErrorMessage="SERVICE UNAVAILABLE"
            )
            return operation
        instance = self._create(body)
        operation = self._operation("insert", target, "RUNNING", target_id=instance["id"])
        self._pending[operation["name"]] = lambda: instance.update(status="RUNNING")
        return operation

    def _check_instance(self, body: Any) -> None:
        """400 for a body GCE would refuse; 404 for a machine type or image it lacks."""
        _shape(body, dict, "resource")
        _fields(body, _INSTANCE_FIELDS, {"name", "machineType", "disks", "networkInterfaces"})
        if not isinstance(body["name"], str) or not _NAME.fullmatch(body["name"]):
            _invalid("resource.name", body["name"])
        machine_type = body["machineType"]
        match = re.fullmatch(
            r"(?:.*/)?zones/([^/]+)/machineTypes/([^/]+)", str(machine_type)
        ) or _invalid("resource.machineType", machine_type)
        if match.group(1) != self.zone:
            _invalid("resource.machineType", machine_type)
        if match.group(2) not in MACHINE_TYPES:
            raise ApiError(
                404,
                "notFound",
                f"The resource 'projects/{self.project}/zones/{self.zone}/machineTypes/"
                f"{match.group(2)}' was not found",
            )
        self._check_disks(body["disks"])
        self._check_nics(body["networkInterfaces"])
        self._check_metadata(body.get("metadata", {"items": []}))
        _check_labels(body.get("labels", {}))
        _check_scheduling(body.get("scheduling", {}))
        accounts = body.get("serviceAccounts", [])
        _shape(accounts, list, "resource.serviceAccounts")
        if len(accounts) > 1:
            _invalid("resource.serviceAccounts", accounts)
        for account in accounts:
            _shape(account, dict, "resource.serviceAccounts[0]")
            _fields(account, {"email", "scopes"}, {"email"})
            email = account["email"]
            if not isinstance(email, str) or (email != "default" and "@" not in email):
                _invalid("resource.serviceAccounts[0].email", email)
            scopes = account.get("scopes", [])
            if not isinstance(scopes, list) or not all(
                isinstance(s, str) and s.startswith("https://www.googleapis.com/auth/")
                for s in scopes
            ):
                _invalid("resource.serviceAccounts[0].scopes", scopes)

    def _check_disks(self, disks: Any) -> None:
        _shape(disks, list, "resource.disks")
        if len(disks) != 1:
            _invalid("resource.disks", disks)  # the provider makes one: the boot disk
        [disk] = disks
        _shape(disk, dict, "resource.disks[0]")
        _fields(disk, _DISK_FIELDS, {"boot", "initializeParams"})
        if disk["boot"] is not True or not isinstance(disk.get("autoDelete", False), bool):
            _invalid("resource.disks[0]", disk)
        params = disk["initializeParams"]
        _shape(params, dict, "resource.disks[0].initializeParams")
        _fields(params, _INIT_FIELDS, {"sourceImage"})
        project, image, minimum = self._image(params["sourceImage"])
        size = params.get("diskSizeGb", str(minimum))
        if not str(size).isdigit():
            _invalid("resource.disks[0].initializeParams.diskSizeGb", size)
        if int(size) < minimum:
            raise ApiError(
                400,
                "invalid",
                f"Requested disk size cannot be smaller than the image size ({minimum} GB)",
            )
        name = params.get("diskName")
        if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
            _invalid("resource.disks[0].initializeParams.diskName", name)
        if name in self._disks:
            raise ApiError(
                409,
                "alreadyExists",
                f"The resource 'projects/{self.project}/zones/{self.zone}/disks/{name}' "
                "already exists",
            )
        disk_type = params.get("diskType", f"zones/{self.zone}/diskTypes/pd-standard")
        match = re.fullmatch(r"(?:.*/)?zones/([^/]+)/diskTypes/([^/]+)", str(disk_type))
        if not match or match.group(1) != self.zone or match.group(2) not in DISK_TYPES:
            _invalid("resource.disks[0].initializeParams.diskType", disk_type)

    def _check_nics(self, nics: Any) -> None:
        _shape(nics, list, "resource.networkInterfaces")
        if len(nics) != 1:
            _invalid("resource.networkInterfaces", nics)
        [nic] = nics
        _shape(nic, dict, "resource.networkInterfaces[0]")
        _fields(nic, _NIC_FIELDS, set())
        if not nic.get("network") and not nic.get("subnetwork"):
            _invalid("resource.networkInterfaces[0]", nic)
        region = self.zone.rsplit("-", 1)[0]
        subnetwork = nic.get("subnetwork")
        if subnetwork is not None and not re.fullmatch(
            rf"(?:.*/)?regions/{region}/subnetworks/[a-z][-a-z0-9]*", str(subnetwork)
        ):
            _invalid("resource.networkInterfaces[0].subnetwork", subnetwork)
        network = nic.get("network")
        if network is not None and not re.fullmatch(
            r"(?:.*/)?global/networks/[a-z][-a-z0-9]*", str(network)
        ):
            _invalid("resource.networkInterfaces[0].network", network)
        for config in nic.get("accessConfigs", []):
            _shape(config, dict, "resource.networkInterfaces[0].accessConfigs[0]")
            _fields(config, {"name", "type"}, {"type"})
            if config["type"] != "ONE_TO_ONE_NAT":
                _invalid("resource.networkInterfaces[0].accessConfigs[0].type", config["type"])

    def _check_metadata(self, metadata: Any) -> None:
        _shape(metadata, dict, "resource.metadata")
        _fields(metadata, {"items"}, set())
        items = metadata.get("items", [])
        _shape(items, list, "resource.metadata.items")
        keys = []
        for item in items:
            _shape(item, dict, "resource.metadata.items[0]")
            _fields(item, {"key", "value"}, {"key"})
            if not isinstance(item["key"], str) or not _METADATA_KEY.fullmatch(item["key"]):
                _invalid("resource.metadata.items[0].key", item["key"])
            if not isinstance(item.get("value", ""), str) or len(item.get("value", "")) > 262144:
                _invalid("resource.metadata.items[0].value", "...")
            keys.append(item["key"])
        if len(set(keys)) != len(keys):
            _invalid("resource.metadata.items", keys)

    def _image(self, source: Any) -> tuple[str, str, int]:
        """(project, image name, minimum disk GiB) of an image path or family; 404 else."""
        match = _IMAGE.fullmatch(str(source)) or _invalid(
            "resource.disks[0].initializeParams.sourceImage", source
        )
        project, family, name = match.groups()
        for (image_project, image), (image_family, minimum) in IMAGES.items():
            if image_project == project and (image_family if family else image) == name:
                return image_project, image, minimum
        raise ApiError(
            404,
            "notFound",
            f"The resource 'projects/{project}/global/images/{family or ''}{name}' was not found",
        )

    def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["name"]
        [disk] = body["disks"]
        params = disk["initializeParams"]
        project, image, minimum = self._image(params["sourceImage"])
        disk_name = params.get("diskName", name)
        size = int(params.get("diskSizeGb", minimum))
        self._disks[disk_name] = self._disk(disk_name, (project, image), size)
        self._disks[disk_name]["users"] = [self._link(f"zones/{self.zone}/instances/{name}")]
        scheduling = {"onHostMaintenance": "MIGRATE", "automaticRestart": True,
                      "preemptible": False, "provisioningModel": "STANDARD",
                      **body.get("scheduling", {})}  # fmt: skip
        if scheduling["provisioningModel"] == "SPOT":  # GCE's defaults for spot
            scheduling.setdefault("instanceTerminationAction", "STOP")
        instance = {
            "kind": "compute#instance",
            "id": _id(),
            "creationTimestamp": _now(),
            "name": name,
            "machineType": self._link(
                f"zones/{self.zone}/machineTypes/{_last(body['machineType'])}"
            ),
            "status": "PROVISIONING",
            "zone": self._link(f"zones/{self.zone}"),
            "networkInterfaces": body["networkInterfaces"],
            "disks": [{
                "kind": "compute#attachedDisk", "type": "PERSISTENT", "mode": "READ_WRITE",
                "source": self._link(f"zones/{self.zone}/disks/{disk_name}"),
                "deviceName": "persistent-disk-0", "index": 0, "boot": True,
                "autoDelete": disk.get("autoDelete", False), "interface": "SCSI",
                "diskSizeGb": str(size),
            }],
            "metadata": {"kind": "compute#metadata", "fingerprint": secrets.token_urlsafe(8),
                         **body.get("metadata", {})},
            "serviceAccounts": body.get("serviceAccounts", []),
            "selfLink": self._link(f"zones/{self.zone}/instances/{name}"),
            "scheduling": scheduling,
            "cpuPlatform": "Unknown CPU Platform",
            "labels": body.get("labels", {}),
            "labelFingerprint": secrets.token_urlsafe(8),
            "fingerprint": secrets.token_urlsafe(8),
        }  # fmt: skip
        self._instances[name] = instance
        self._consoles[name] = (
            f"SeaBIOS (version 1.8.2-google)\nBooting from Hard Disk 0...\n{name} login: \n"  # noqa: E501
        )
        return instance

    def _disk(self, name: str, image: tuple[str, str], size: int) -> dict[str, Any]:
        return {
            "kind": "compute#disk",
            "id": _id(),
            "creationTimestamp": _now(),
            "name": name,
            "sizeGb": str(size),
            "zone": self._link(f"zones/{self.zone}"),
            "status": "READY",
            "selfLink": self._link(f"zones/{self.zone}/disks/{name}"),
            "sourceImage": f"{LINK}{_image_path(*image)}",
            "type": self._link(f"zones/{self.zone}/diskTypes/pd-balanced"),
            "users": [],
        }

    def get(self, name: str) -> dict[str, Any]:
        return self._found(self._instances, "instances", name)

    def delete(self, name: str) -> dict[str, Any]:
        instance = self._found(self._instances, "instances", name)
        del self._instances[name]
        self._consoles.pop(name, None)
        for disk in instance["disks"]:
            disk_name = _last(disk["source"])
            if disk["autoDelete"]:
                self._disks.pop(disk_name, None)
            elif disk_name in self._disks:
                self._disks[disk_name]["users"] = []
        return self._operation("delete", instance["selfLink"], "DONE", target_id=instance["id"])

    def list(self, query: Mapping[str, str]) -> dict[str, Any]:
        items = sorted(self._instances.values(), key=lambda instance: instance["name"])
        if "filter" in query:
            match = _FILTER.fullmatch(query["filter"]) or _invalid("filter", query["filter"])
            key, value = match.groups()
            items = [i for i in items if i.get("labels", {}).get(key) == value]
        size = min(int(query.get("maxResults", self.page_size)), self.page_size)
        start = int(query.get("pageToken", "0") or 0)
        page = {
            "kind": "compute#instanceList",
            "id": f"projects/{self.project}/zones/{self.zone}/instances",
            "selfLink": self._link(f"zones/{self.zone}/instances"),
        }
        if items[start : start + size]:  # GCE leaves items out of an empty page
            page["items"] = items[start : start + size]
        if start + size < len(items):
            page["nextPageToken"] = str(start + size)
        return page

    def serial_port(self, name: str, query: Mapping[str, str]) -> dict[str, Any]:
        instance = self._found(self._instances, "instances", name)
        if query.get("port", "1") not in ("1", "2", "3", "4"):
            _invalid("port", query["port"])
        contents = self._consoles.get(name, "")
        return {
            "kind": "compute#serialPortOutput",
            "contents": contents,
            "start": "0",
            "next": str(len(contents)),
            "selfLink": f"{instance['selfLink']}/serialPort",
        }

    def operation(self, name: str) -> dict[str, Any]:
        """An operation; one still running is done the next time anyone looks at it."""
        operation = self._found(self._operations, "operations", name)
        finish = self._pending.pop(name, None)
        if finish is not None:
            finish()
            operation.update(status="DONE", progress=100, endTime=_now())
        return operation

    def disk(self, name: str) -> dict[str, Any]:
        return self._found(self._disks, "disks", name)

    def delete_disk(self, name: str) -> dict[str, Any]:
        disk = self._found(self._disks, "disks", name)
        if disk["users"]:
            raise ApiError(
                400,
                "resourceInUseByAnotherResource",
                f"The disk resource '{disk['selfLink']}' is already being used by "
                f"'{disk['users'][0]}'",
            )
        del self._disks[name]
        return self._operation("delete", disk["selfLink"], "DONE", target_id=disk["id"])

    def machine_type(self, name: str) -> dict[str, Any]:
        if name not in MACHINE_TYPES:
            raise ApiError(
                404,
                "notFound",
                f"The resource 'projects/{self.project}/zones/{self.zone}/machineTypes/{name}' "
                "was not found",
            )
        cpus, memory = MACHINE_TYPES[name]
        machine_type = {
            "kind": "compute#machineType",
            "id": str(abs(hash(name)) % 10**10),
            "name": name,
            "description": f"{cpus} vCPUs, {memory / 1024:g} GB RAM",
            "guestCpus": cpus,
            "memoryMb": memory,
            "zone": self.zone,
            "isSharedCpu": False,
            "architecture": "ARM64" if name in ARM64 else "X86_64",
            "selfLink": self._link(f"zones/{self.zone}/machineTypes/{name}"),
        }
        if name in ACCELERATORS:  # GCE leaves the field out of the others
            machine_type["accelerators"] = [
                {"guestAcceleratorType": kind, "guestAcceleratorCount": count}
                for kind, count in ACCELERATORS[name]
            ]
        return machine_type

    def machine_types(self, query: Mapping[str, str]) -> dict[str, Any]:
        items = [self.machine_type(name) for name in sorted(MACHINE_TYPES)]
        return self._page(items, query, "machineTypeList", f"zones/{self.zone}/machineTypes")

    def region(self, project: str, region: str) -> dict[str, Any]:
        """The zone's region, whose only zone it is here."""
        if project != self.project or region != self.zone.rsplit("-", 1)[0]:
            raise ApiError(
                404, "notFound", f"The resource 'projects/{project}/regions/{region}' was not found"
            )
        return {
            "kind": "compute#region",
            "id": str(abs(hash(region)) % 10**10),
            "name": region,
            "status": "UP",
            "zones": [self._link(f"zones/{self.zone}")],
            "selfLink": self._link(f"regions/{region}"),
        }

    def skus(self, service: str, query: Mapping[str, str]) -> dict[str, Any]:
        """services.skus.list: a page of the service's SKUs, and the token of the next."""
        if service != BILLING_SERVICE:
            raise BillingError(404, "NOT_FOUND", f"Service services/{service} not found.")
        if query.get("currencyCode", "USD") != "USD":  # Google converts; this one does not
            raise BillingError(400, "INVALID_ARGUMENT", "Only USD is served by this stand-in.")
        size = query.get("pageSize", "5000")
        if not size.isdigit() or not 0 < int(size) <= 5000:
            raise BillingError(400, "INVALID_ARGUMENT", f"Invalid page size: {size}")
        token = query.get("pageToken", "")
        if token and token not in self._sku_pages:
            raise BillingError(400, "INVALID_ARGUMENT", "Invalid page token.")
        start = self._sku_pages.get(token, 0)
        end = start + min(int(size), self.sku_page_size)
        page: dict[str, Any] = {"skus": self._skus[start:end]}
        if end < len(self._skus):
            page["nextPageToken"] = secrets.token_urlsafe(24)
            self._sku_pages[page["nextPageToken"]] = end
        return page  # the last without a token (proto3's JSON leaves an empty one out)

    def _page(
        self, items: list[dict[str, Any]], query: Mapping[str, str], kind: str, path: str
    ) -> dict[str, Any]:
        """One page of a compute list, as the instances' list pages."""
        size = min(int(query.get("maxResults", self.page_size)), self.page_size)
        start = int(query.get("pageToken", "0") or 0)
        page = {"kind": f"compute#{kind}", "id": f"projects/{self.project}/{path}",
                "selfLink": self._link(path)}  # fmt: skip
        if items[start : start + size]:  # GCE leaves items out of an empty page
            page["items"] = items[start : start + size]
        if start + size < len(items):
            page["nextPageToken"] = str(start + size)
        return page

    def image(self, project: str, name: str, *, family: bool) -> dict[str, Any]:
        project, image, minimum = self._image(_image_path(project, name, family=family))
        return {
            "kind": "compute#image",
            "id": str(abs(hash(image)) % 10**10),
            "name": image,
            "family": IMAGES[(project, image)][0],
            "status": "READY",
            "diskSizeGb": str(minimum),
            "architecture": "X86_64",
            "selfLink": f"{LINK}{_image_path(project, image)}",
        }

    def _found(self, table: dict[str, dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
        if name not in table:
            raise ApiError(
                404,
                "notFound",
                f"The resource 'projects/{self.project}/zones/{self.zone}/{kind}/{name}' "
                "was not found",
            )
        return table[name]

    def _operation(
        self, kind: str, target: str, status: str, *, target_id: str = ""
    ) -> dict[str, Any]:
        name = f"operation-{secrets.token_hex(6)}-{secrets.token_hex(4)}"
        operation = {
            "kind": "compute#operation",
            "id": _id(),
            "name": name,
            "zone": self._link(f"zones/{self.zone}"),
            "operationType": kind,
            "targetLink": target,
            "targetId": target_id or _id(),
            "status": status,
            "user": SERVICE_ACCOUNT,
            "progress": 100 if status == "DONE" else 0,
            "insertTime": _now(),
            "startTime": _now(),
            "selfLink": self._link(f"zones/{self.zone}/operations/{name}"),
        }
        if status == "DONE":
            operation["endTime"] = _now()
        self._operations[name] = operation
        return operation


def _sku(
    description: str, regions: list[str], usd: float, unit: str, usage_type: str
) -> dict[str, Any]:
    """A SKU document of Compute Engine, as services.skus.list lists it."""
    digest = hashlib.sha256(description.encode()).hexdigest()[:12].upper()
    sku_id = f"{digest[:4]}-{digest[4:8]}-{digest[8:]}"
    price = Decimal(str(usd))
    unit_description, base_unit, base_description, factor = _UNITS[unit]
    if "GPU" in description:
        group = "GPU"
    elif unit == "GiBy.mo":
        group = "SSD"
    else:
        group = "RAM" if unit == "GiBy.h" else "CPU"
    return {
        "name": f"services/{BILLING_SERVICE}/skus/{sku_id}",
        "skuId": sku_id,
        "description": description,
        "category": {
            "serviceDisplayName": "Compute Engine",
            "resourceFamily": "Storage" if group == "SSD" else "Compute",
            "resourceGroup": group,
            "usageType": usage_type,
        },
        "serviceRegions": list(regions),
        "pricingInfo": [{
            "summary": "",
            "pricingExpression": {
                "usageUnit": unit, "displayQuantity": 1,
                "tieredRates": [{"startUsageAmount": 0, "unitPrice": {
                    "currencyCode": "USD", "units": str(int(price)),
                    "nanos": int((price - int(price)) * 10**9)}}],
                "usageUnitDescription": unit_description, "baseUnit": base_unit,
                "baseUnitDescription": base_description, "baseUnitConversionFactor": factor,
            },
            "currencyConversionRate": 1,
            "effectiveTime": "2025-06-01T07:00:00.000Z",
        }],
        "serviceProviderName": "Google",
        "geoTaxonomy": {"type": "MULTI_REGIONAL" if len(regions) > 1 else "REGIONAL",
                        "regions": list(regions)},
    }  # fmt: skip


def _image_path(project: str, name: str, *, family: bool = False) -> str:
    return f"projects/{project}/global/images/{'family/' if family else ''}{name}"


def _last(link: str) -> str:
    return str(link).rstrip("/").rsplit("/", 1)[-1]


def _shape(value: Any, kind: type, field: str) -> None:
    if not isinstance(value, kind):
        _invalid(field, value)


def _fields(body: dict[str, Any], allowed: set[str], required: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(
            400, "invalid", f'Invalid JSON payload received. Unknown name "{unknown[0]}"'
        )
    missing = sorted(required - set(body))
    if missing:
        raise ApiError(400, "required", f"Required field '{missing[0]}' not specified")


def _invalid(field: str, value: Any) -> Any:
    raise ApiError(400, "invalid", f"Invalid value for field '{field}': '{value}'.")


def _check_labels(labels: Any) -> None:
    _shape(labels, dict, "resource.labels")
    if len(labels) > 64:
        _invalid("resource.labels", f"{len(labels)} labels")
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key) or not isinstance(value, str):
            _invalid("resource.labels", key)
        if not _LABEL_VALUE.fullmatch(value):
            _invalid(f"resource.labels.{key}", value)


def _check_scheduling(scheduling: Any) -> None:
    _shape(scheduling, dict, "resource.scheduling")
    _fields(scheduling, _SCHEDULING_FIELDS, set())
    model = scheduling.get("provisioningModel", "STANDARD")
    if model not in ("SPOT", "STANDARD"):
        _invalid("resource.scheduling.provisioningModel", model)
    action = scheduling.get("instanceTerminationAction")
    if action is not None and (model != "SPOT" or action not in ("DELETE", "STOP")):
        _invalid("resource.scheduling.instanceTerminationAction", action)
    maintenance = scheduling.get("onHostMaintenance", "TERMINATE" if model == "SPOT" else "MIGRATE")
    if maintenance not in ("MIGRATE", "TERMINATE"):
        _invalid("resource.scheduling.onHostMaintenance", maintenance)
    if model == "SPOT" and (maintenance != "TERMINATE" or scheduling.get("automaticRestart")):
        raise ApiError(
            400,
            "invalid",
            "Invalid value for field 'resource.scheduling': Spot VMs must have "
            "automaticRestart false and onHostMaintenance TERMINATE",
        )
    if not isinstance(scheduling.get("automaticRestart", False), bool):
        _invalid("resource.scheduling.automaticRestart", scheduling["automaticRestart"])


# (method, path pattern) -> (route, the query parameters it takes); paths under /compute/v1.
_ZONE = r"/projects/(?P<project>[^/]+)/zones/(?P<zone>[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str, set[str]]] = [
    (method, re.compile(f"/compute/v1{pattern}"), route, query)
    for method, pattern, route, query in [
        ("POST", f"{_ZONE}/instances", "insert", {"requestId"}),
        ("GET", f"{_ZONE}/instances", "list",
         {"filter", "maxResults", "pageToken", "orderBy", "returnPartialSuccess"}),
        ("GET", f"{_ZONE}/instances/(?P<name>[^/]+)", "get", set()),
        ("DELETE", f"{_ZONE}/instances/(?P<name>[^/]+)", "delete", {"requestId"}),
        ("GET", f"{_ZONE}/instances/(?P<name>[^/]+)/serialPort", "serial_port", {"port", "start"}),
        ("GET", f"{_ZONE}/operations/(?P<name>[^/]+)", "operation", set()),
        ("POST", f"{_ZONE}/operations/(?P<name>[^/]+)/wait", "operation", set()),
        ("GET", f"{_ZONE}/disks/(?P<name>[^/]+)", "disk", set()),
        ("DELETE", f"{_ZONE}/disks/(?P<name>[^/]+)", "delete_disk", {"requestId"}),
        ("GET", f"{_ZONE}/machineTypes/(?P<name>[^/]+)", "machine_type", set()),
        ("GET", f"{_ZONE}/machineTypes", "machine_types",
         {"maxResults", "pageToken", "returnPartialSuccess"}),
        ("GET", r"/projects/(?P<project>[^/]+)/regions/(?P<region>[^/]+)", "region", set()),
        ("GET", r"/projects/(?P<project>[^/]+)/global/images/family/(?P<name>[^/]+)",
         "image_family", set()),
        ("GET", r"/projects/(?P<project>[^/]+)/global/images/(?P<name>[^/]+)", "image", set()),
    ]
] + [
    # Cloud Billing's, at the root of its own host
    ("GET", re.compile(r"/v1/services/(?P<service>[^/]+)/skus"), "skus",
     {"pageSize", "pageToken", "currencyCode", "startTime", "endTime"}),
]  # fmt: skip


def _route(method: str, path: str) -> tuple[str, re.Match[str], set[str]]:
    """The route of ``method path``, its match, the query parameters it takes; 404 else."""
    for route_method, pattern, route, allowed in _ROUTES:
        match = pattern.fullmatch(path)
        if route_method == method and match:
            return route, match, allowed
    if path.startswith("/v1/"):
        raise BillingError(404, "NOT_FOUND", f"No such method: {method} {path}")
    raise ApiError(404, "notFound", f"No such method: {method} {path}")


def _call(api: GceApi, route: str, match: re.Match[str], query: dict[str, str], body: Any) -> Any:
    """Carry out one API call (under the stand-in's lock)."""
    groups = match.groupdict()
    if route == "image_family":
        return api.image(groups["project"], groups["name"], family=True)
    if route == "image":
        return api.image(groups["project"], groups["name"], family=False)
    if route == "region":
        return api.region(groups["project"], groups["region"])
    if route == "skus":
        return api.skus(groups["service"], query)
    api._zone_path(groups["project"], groups["zone"])
    name = groups.get("name", "")
    calls: dict[str, Callable[[], Any]] = {
        "insert": lambda: api.insert(body),
        "list": lambda: api.list(query),
        "get": lambda: api.get(name),
        "delete": lambda: api.delete(name),
        "serial_port": lambda: api.serial_port(name, query),
        "operation": lambda: api.operation(name),
        "disk": lambda: api.disk(name),
        "delete_disk": lambda: api.delete_disk(name),
        "machine_type": lambda: api.machine_type(name),
        "machine_types": lambda: api.machine_types(query),
    }
    return calls[route]()


def _handler(api: GceApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as requests' sessions use it

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def do_DELETE(self) -> None:
            self._serve()

        def _serve(self) -> None:
            split = urlsplit(self.path)
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if split.path == "/" or split.path.startswith("/computeMetadata/"):
                return self._metadata(split.path, parse_qs(split.query))
            try:
                self._json(200, self._api(split.path, split.query, raw))
            except ApiError as exc:
                self._json(exc.status, exc.document())

        def _api(self, path: str, raw_query: str, raw: bytes) -> Any:
            if self.headers.get("Authorization") != f"Bearer {api.token}" or api.revoked:
                if path.startswith("/v1/"):  # the billing API's words
                    raise BillingError(
                        401,
                        "UNAUTHENTICATED",
                        "Request had invalid authentication credentials. Expected OAuth 2 "
                        "access token, login cookie or other valid authentication credential.",
                    )
                raise ApiError(
                    401,
                    "required" if not self.headers.get("Authorization") else "authError",
                    "Request is missing required authentication credential. Expected OAuth "
                    "2 access token, login cookie or other valid authentication credential.",
                )
            route, match, allowed = _route(self.command, path)
            pairs = parse_qs(raw_query, keep_blank_values=True)
            unknown = sorted(set(pairs) - allowed)
            if unknown or any(len(values) > 1 for values in pairs.values()):
                said = f"Invalid query parameter: {(unknown or pairs)}"
                if route == "skus":
                    raise BillingError(400, "INVALID_ARGUMENT", said)
                raise ApiError(400, "invalidParameter", said)
            query = {key: values[0] for key, values in pairs.items()}
            body = None
            if route == "insert":
                if self.headers.get("Content-Type", "").split(";")[0] != "application/json":
                    raise ApiError(400, "parseError", "The request body must be JSON")
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise ApiError(400, "parseError", "This API does not support parsing "
                                   "form-encoded input.") from None  # fmt: skip
            elif raw:
                raise ApiError(400, "invalid", f"{self.command} {path} takes no request body")
            with api._lock:
                api.requests.append((self.command, path))
                return _call(api, route, match, query, body)

        def _metadata(self, path: str, query: dict[str, list[str]]) -> None:
            """google-auth's view of the metadata server on a GCE VM: its ping, the
            project, the service account, its token."""
            if self.command != "GET" or self.headers.get("Metadata-Flavor") != "Google":
                return self._text(403, "Missing Metadata-Flavor:Google header.")
            root = "/computeMetadata/v1/"
            accounts = f"{root}instance/service-accounts/"
            # The account by its email as by its alias: google-auth asks by the email once
            # it knows it (when it refreshes a token again).
            if path.startswith(f"{accounts}{SERVICE_ACCOUNT}/"):
                path = f"{accounts}default/{path.removeprefix(f'{accounts}{SERVICE_ACCOUNT}/')}"
            account = f"{accounts}default/"
            if path == "/":
                return self._text(200, "computeMetadata/\n")
            if path == f"{root}project/project-id":
                return self._text(200, api.project)
            if path == f"{root}universe/universe-domain":
                return self._text(200, "googleapis.com")
            if path == account and query.get("recursive") == ["true"]:
                return self._json(200, {"aliases": ["default"], "email": SERVICE_ACCOUNT,
                                        "scopes": ["https://www.googleapis.com/auth/cloud-platform"]})  # fmt: skip # noqa: E501
            if path == f"{account}token":
                return self._json(
                    200, {"access_token": api.token, "expires_in": 3599, "token_type": "Bearer"}
                )
            self._text(404, "Not Found")

        def _json(self, status: int, document: Any) -> None:
            self._send(status, json.dumps(document).encode(), "application/json")

        def _text(self, status: int, text: str) -> None:
            self._send(status, text.encode(), "application/text")

        def _send(self, status: int, data: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            if self.path == "/" or self.path.startswith("/computeMetadata/"):
                self.send_header("Metadata-Flavor", "Google")
            self.end_headers()
            self.wfile.write(data)

    return Handler
