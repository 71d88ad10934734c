"""A loopback stand-in for the Azure Resource Manager endpoints the azure provider uses (VMs,
NICs, public IPs, managed disks, their async operations, boot diagnostics, the Resource SKUs
list), an App Service style managed-identity token endpoint, and (on a port of its own, as
prices.azure.com is a host of its own) the public Azure Retail Prices API, over TLS with a
throwaway certificate.

    with AzureApi() as api:
        ComputeManagementClient(StaticToken(), api.subscription, base_url=api.url,
                                credential_scopes=[api.scope], connection_verify=api.ca_file)
        os.environ.update(api.env())   # or: a worker process, through DefaultAzureCredential

Strict as ARM is: a bearer token and ``api-version`` on every request, unknown members and
bad values refused with ARM's error JSON, images and sizes checked against a small catalog,
creates and deletes answered 201/202 with ``Azure-AsyncOperation`` to poll until the
operation ends. A VM's OS disk and NIC are resources of their own (a stopped VM keeps them;
``deleteOption: Delete`` removes them with it). Tests make capacity fail (``no_capacity``),
power a VM off from inside (``power_off``) and read the custom data ARM never returns.

The Resource SKUs list (``GET /subscriptions/{sub}/providers/Microsoft.Compute/skus``) holds
the VM sizes of ``SIZES`` in each of ``REGIONS``, as ARM's documents (capabilities as
name/value strings, locationInfo, restrictions), among other resource types' SKUs, and one
size the subscription may not use (``RESTRICTED_SIZE``). The price list (``api.prices``,
at ``api.prices_url``) takes no credentials and refuses a request that carries any; it holds,
for each size and region, the Linux pay-as-you-go meter and its decoys (Windows, Spot, Low
Priority, DevTest, reservations, a non-primary meter); tests add or withdraw meters.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import json
import re
import secrets
import shutil
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from devtools.server_process import HOST

TOKEN = "test-token"  # the one bearer token ARM accepts (the token endpoint hands it out)
SUBSCRIPTION = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"
RESOURCE_GROUP = "prefect-vms"
LOCATION = "westeurope"
# The locations the SKU and price lists know (the price list names them its own way).
REGIONS = {"westeurope": "EU West", "eastus": "US East", "westus2": "US West 2"}
IMAGE_NAME = "prefect-vm-runner"
IMAGE_SIZE_GB = 30  # the image's OS disk: a smaller diskSizeGB is refused
# size -> (vCPUs, GiB of memory)
SIZES = {
    "Standard_D2s_v5": (2, 8),
    "Standard_D4s_v5": (4, 16),
    "Standard_D4as_v5": (4, 16),
    "Standard_E4s_v5": (4, 32),
    "Standard_NC4as_T4_v3": (4, 28),
    "Standard_D2ps_v5": (2, 8),
}
# A size ARM lists with a NotAvailableForSubscription restriction in every location: VMs of
# it are refused (it is not in SIZES) and it has prices, as the real one does.
RESTRICTED_SIZE = "Standard_NC24ads_A100_v4"
# size -> (family, the price list's series, NVIDIA GPUs, arm): what the SKU list and the
# price list say beyond SIZES
_SKU_FACTS = {
    "Standard_D2s_v5": ("standardDSv5Family", "Dsv5", 0, False),
    "Standard_D4s_v5": ("standardDSv5Family", "Dsv5", 0, False),
    "Standard_D4as_v5": ("standardDASv5Family", "Dasv5", 0, False),
    "Standard_E4s_v5": ("standardESv5Family", "Esv5", 0, False),
    "Standard_NC4as_T4_v3": ("Standard NCASv3_T4 Family", "NCasT4 v3", 1, False),
    "Standard_D2ps_v5": ("standardDPSv5Family", "Dpsv5", 0, True),
    RESTRICTED_SIZE: ("StandardNCADSA100v4Family", "NCadsA100 v4", 1, False),
}
_RESTRICTED_SPEC = (24, 220)
# The Linux pay-as-you-go list price in eastus, USD per hour; other regions cost more.
LINUX_PRICES = {
    "Standard_D2s_v5": 0.096,
    "Standard_D4s_v5": 0.192,
    "Standard_D4as_v5": 0.172,
    "Standard_E4s_v5": 0.252,
    "Standard_NC4as_T4_v3": 0.526,
    "Standard_D2ps_v5": 0.077,
    RESTRICTED_SIZE: 3.673,
}
_REGION_FACTOR = {"eastus": 1.0, "westus2": 1.0, "westeurope": 1.15}
_KINDS = {
    ("microsoft.compute", "virtualmachines"): "Microsoft.Compute/virtualMachines",
    ("microsoft.compute", "disks"): "Microsoft.Compute/disks",
    ("microsoft.network", "networkinterfaces"): "Microsoft.Network/networkInterfaces",
    ("microsoft.network", "publicipaddresses"): "Microsoft.Network/publicIPAddresses",
}
_API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")
_RESERVED_USERS = {"admin", "administrator", "root", "guest", "user", "test", "sys", "adm"}
_TAG_NAME_BAD = set("<>%&\\?/")
_USER_IDENTITY = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/"
    r"Microsoft\.ManagedIdentity/userAssignedIdentities/[^/]+$",
    re.IGNORECASE,
)
_NSG = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/"
    r"Microsoft\.Network/networkSecurityGroups/[^/]+$",
    re.IGNORECASE,
)


class ArmError(Exception):
    """An ARM error answer: status, code, message (and target)."""

    def __init__(self, status: int, code: str, message: str, target: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.target = status, code, message, target

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.target:
            error["target"] = self.target
        return {"error": error}


def _bad(message: str, target: str | None = None, code: str = "InvalidParameter") -> ArmError:
    return ArmError(400, code, message, target)


def _unknown(where: str, member: str) -> ArmError:
    # What the compute RP says about a member it does not know.
    return ArmError(
        400,
        "InvalidRequestContent",
        f"The request content was invalid and could not be deserialized: 'Could not find "
        f"member '{member}' on object of type '{where}'.",
    )


class StaticToken:
    """A credential for in-process SDK clients of the stand-in: always ``TOKEN``."""

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken(TOKEN, int(time.time()) + 24 * 3600)


@dataclass
class _Operation:
    """An async operation: in progress until ``due``, then ``finish`` runs (under the lock)
    and its status is Succeeded, or Failed with ``error``."""

    id: str
    namespace: str
    due: float
    finish: Callable[[], None]
    error: dict[str, str] | None = None
    started: str = field(default_factory=lambda: _now())
    ended: str | None = None


@dataclass
class _Capacity:
    size: str | None
    priority: str | None
    code: str


class AzureApi:
    """``with AzureApi() as api: api.url``; one subscription, one resource group and location,
    a subnet (``subnet_id``) and an image (``image_id``) that exist. Operations take
    ``operation_seconds``; lists come ``page_size`` VMs a page (one: clients must follow
    ``nextLink``)."""

    def __init__(
        self,
        *,
        subscription: str = SUBSCRIPTION,
        resource_group: str = RESOURCE_GROUP,
        location: str = LOCATION,
        operation_seconds: float = 1.5,
        retry_after: int = 1,
        page_size: int = 1,
    ) -> None:
        self.subscription, self.resource_group, self.location = (
            subscription,
            resource_group,
            location,
        )
        self.operation_seconds, self.retry_after, self.page_size = (
            operation_seconds,
            retry_after,
            page_size,
        )
        self.image_id = self._rid("Microsoft.Compute/images", IMAGE_NAME)
        self.subnet_id = (
            self._rid("Microsoft.Network/virtualNetworks", "runner-vnet") + "/subnets/default"
        )
        self.identity_id = self._rid(
            "Microsoft.ManagedIdentity/userAssignedIdentities", "runner-identity"
        )
        self.identity_header = secrets.token_hex(16)
        # What the token endpoint hands out: ARM accepts TOKEN only (tests hand out another
        # to have the credentials refused).
        self.issued_token = TOKEN
        self.sku_page_size = 4
        # Every VM body a PUT was accepted with, deleted or not, by lower-case name.
        self.vm_requests: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every ARM request
        self._lock = threading.RLock()
        self._resources: dict[tuple[str, str], dict[str, Any]] = {}  # (kind, name) -> JSON
        self._custom_data: dict[str, str] = {}
        self._power: dict[str, str] = {}  # VM name -> starting | running | stopped
        self._console: dict[str, str] = {}
        self._operations: dict[str, _Operation] = {}
        self._capacity: list[_Capacity] = []
        self._sas = secrets.token_urlsafe(16)
        self._dir = Path(tempfile.mkdtemp(prefix="azure-api-"))
        self.ca_file = str(self._dir / "ca.pem")
        context = _tls_context(self._dir)
        self._httpd = _TlsServer((HOST, 0), _handler(self), context)
        self.url = f"https://{HOST}:{self._httpd.server_address[1]}"
        self.scope = f"{self.url}/.default"  # the token audience ARM here accepts
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._prices_httpd = _TlsServer((HOST, 0), _prices_handler(self), context)
        self.prices_url = f"https://{HOST}:{self._prices_httpd.server_address[1]}"
        self.prices = RetailPrices(self.prices_url)
        self._prices_thread = threading.Thread(target=self._prices_httpd.serve_forever, daemon=True)

    def __enter__(self) -> AzureApi:
        self._thread.start()
        self._prices_thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for httpd in (self._httpd, self._prices_httpd):
            httpd.shutdown()
            httpd.server_close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        """What a process needs to use the stand-in: the provider's ARM endpoint (and the
        catalog refresh's price list), trust in the certificate, and a managed identity (App
        Service's protocol) for DefaultAzureCredential."""
        return {
            "RUNNER_AZURE_ARM_ENDPOINT": self.url,
            "RUNNER_AZURE_PRICES_ENDPOINT": self.prices_url,
            "REQUESTS_CA_BUNDLE": self.ca_file,
            "IDENTITY_ENDPOINT": f"{self.url}/msi/token",
            "IDENTITY_HEADER": self.identity_header,
        }

    # -- what tests do and see -------------------------------------------------------------

    def no_capacity(
        self,
        size: str | None = None,
        priority: str | None = None,
        *,
        code: str = "AllocationFailed",
    ) -> None:
        """From now on VMs of ``size`` (any when None) and ``priority`` (Regular, Spot; any
        when None) fail for capacity: ``SkuNotAvailable`` at once (409), the allocation
        errors when the create operation ends (the VM stays, Failed, with its disk)."""
        self._capacity.append(_Capacity(size, priority, code))

    def power_off(self, name: str) -> None:
        """The guest shut itself down: PowerState/stopped, still allocated (and billed)."""
        with self._lock:
            self._advance()
            if ("virtualMachines", name.lower()) in self._resources:
                self._power[name.lower()] = "stopped"

    def custom_data(self, name: str) -> str:
        """The VM's custom data, decoded (ARM itself never returns it)."""
        with self._lock:
            return base64.b64decode(self._custom_data[name.lower()]).decode()

    def append_console(self, name: str, text: str) -> None:
        with self._lock:
            self._console[name.lower()] = self._console.get(name.lower(), "") + text

    def vms(self, tag: tuple[str, str] | None = None, *, power: str | None = None) -> list[str]:
        """Names of the VMs that exist (with tag ``(key, value)``, in power state ``power``)."""
        with self._lock:
            self._advance()
            return sorted(
                body["name"]
                for (kind, key), body in self._resources.items()
                if kind == "virtualMachines"
                and (tag is None or (body.get("tags") or {}).get(tag[0]) == tag[1])
                and (power is None or self._power.get(key) == power)
            )

    def vm(self, name: str) -> dict[str, Any] | None:
        """The VM's JSON as ARM returns it now (with its instance view), or None."""
        with self._lock:
            self._advance()
            body = self._resources.get(("virtualMachines", name.lower()))
            return None if body is None else self._with_instance_view(body)

    def resources(self) -> dict[str, list[str]]:
        """Everything that exists (and would bill): kind -> names."""
        with self._lock:
            self._advance()
            found: dict[str, list[str]] = {}
            for kind, _ in self._resources:
                found.setdefault(kind, [])
            for (kind, _), body in sorted(self._resources.items()):
                found[kind].append(body["name"])
            return {kind: names for kind, names in found.items() if names}

    # -- resources ---------------------------------------------------------------------

    def _rid(self, kind: str, name: str) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/{kind}/{name}"
        )

    def _own(self, resource_id: str, kind: str) -> str | None:
        """The name of ``resource_id`` when it is a ``kind`` of this resource group."""
        prefix = self._rid(kind, "").lower()
        lowered = resource_id.lower()
        if lowered.startswith(prefix) and "/" not in lowered[len(prefix) :]:
            return resource_id[len(prefix) :] or None
        return None

    def _advance(self) -> None:
        """Operations whose time has come end now (checked at every request)."""
        now = time.monotonic()
        for op in self._operations.values():
            if op.ended is None and op.due <= now:
                op.finish()
                op.ended = _now()

    def _operation(
        self, namespace: str, finish: Callable[[], None], error: dict[str, str] | None = None
    ) -> tuple[_Operation, dict[str, str]]:
        """A new async operation and the headers that point at it."""
        op = _Operation(
            uuid.uuid4().hex, namespace, time.monotonic() + self.operation_seconds, finish, error
        )
        self._operations[op.id] = op
        base = (
            f"{self.url}/subscriptions/{self.subscription}/providers/{namespace}/locations/"
            f"{self.location}/operations/{op.id}"
        )
        headers = {
            "Azure-AsyncOperation": f"{base}?p={uuid.uuid4()}&api-version=2024-07-01",
            "Retry-After": str(self.retry_after),
        }
        return op, headers

    def _get(self, kind: str, name: str) -> dict[str, Any]:
        body = self._resources.get((kind, name.lower()))
        if body is None:
            namespace = "Microsoft.Network" if kind[0] in "np" else "Microsoft.Compute"
            raise ArmError(
                404,
                "ResourceNotFound",
                f"The Resource '{namespace}/{kind}/{name}' under resource group "
                f"'{self.resource_group}' was not found. For more details please go to "
                "https://aka.ms/ARMResourceNotFoundFix",
            )
        return body

    # -- virtual machines --------------------------------------------------------------

    def put_vm(self, name: str, body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        key = name.lower()
        if ("virtualMachines", key) in self._resources:
            raise ArmError(409, "OperationNotAllowed", "this stand-in creates VMs, never updates")
        spec = _VmSpec.read(self, name, body)
        capacity = self._capacity_error(spec.size, spec.priority)
        if capacity and capacity.code == "SkuNotAvailable":
            raise ArmError(
                409,
                "SkuNotAvailable",
                f"The requested VM size for resource 'Following SKUs have failed for Capacity "
                f"Restrictions: {spec.size}' is currently not available in location "
                f"'{self.location}'. Please try another size or deploy to a different location "
                "or different zone. See https://aka.ms/azureskunotavailable for details.",
            )
        self.vm_requests[key] = json.loads(json.dumps(body))
        vm_id = self._rid("Microsoft.Compute/virtualMachines", name)
        disk_name = spec.disk_name or f"{name}_OsDisk_1_{uuid.uuid4().hex}"
        disk_id = self._rid("Microsoft.Compute/disks", disk_name)
        self._resources[("disks", disk_name.lower())] = {
            "id": disk_id,
            "name": disk_name,
            "type": "Microsoft.Compute/disks",
            "location": self.location,
            "managedBy": vm_id,
            "sku": {"name": spec.disk_type, "tier": spec.disk_type.split("_")[0]},
            "properties": {
                "osType": "Linux",
                "creationData": {"createOption": "FromImage", "imageReference": {"id": spec.image}},
                "diskSizeGB": spec.disk_size,
                "diskState": "Attached",
                "provisioningState": "Succeeded",
                "timeCreated": _now(),
            },
        }
        for nic_key in spec.nics:
            nic = self._resources[("networkInterfaces", nic_key)]
            nic["properties"]["virtualMachine"] = {"id": vm_id}
        properties = json.loads(json.dumps(body["properties"]))
        os_profile = properties["osProfile"]
        self._custom_data[key] = os_profile.pop("customData", "")
        os_profile.pop("adminPassword", None)  # write-only, as in ARM
        os_profile.setdefault("secrets", [])
        os_profile.setdefault("allowExtensionOperations", True)
        os_profile.setdefault("requireGuestProvisionSignal", True)
        os_disk = properties["storageProfile"]["osDisk"]
        os_disk.update(
            {
                "osType": "Linux",
                "name": disk_name,
                "caching": os_disk.get("caching", "ReadWrite"),
                "deleteOption": os_disk.get("deleteOption", "Detach"),
                "diskSizeGB": spec.disk_size,
                "managedDisk": {"storageAccountType": spec.disk_type, "id": disk_id},
            }
        )
        properties["storageProfile"].setdefault("dataDisks", [])
        for reference in properties["networkProfile"]["networkInterfaces"]:
            reference.setdefault("properties", {}).setdefault("deleteOption", "Detach")
        properties.update(
            {"vmId": str(uuid.uuid4()), "provisioningState": "Creating", "timeCreated": _now()}
        )
        vm: dict[str, Any] = {
            "name": name,
            "id": vm_id,
            "type": "Microsoft.Compute/virtualMachines",
            "location": self.location,
            "properties": properties,
        }
        for optional in ("tags", "zones"):
            if optional in body:
                vm[optional] = body[optional]
        if "identity" in body:
            vm["identity"] = _identity_answer(body["identity"])
        self._resources[("virtualMachines", key)] = vm
        self._power[key] = "starting"
        self._console[key] = f"[    0.000000] Linux version 6.1.0-28-cloud-amd64 ({name})\n"

        def finish() -> None:
            if ("virtualMachines", key) not in self._resources:
                return
            if capacity:
                properties["provisioningState"] = "Failed"
                self._power.pop(key, None)
            else:
                properties["provisioningState"] = "Succeeded"
                self._power[key] = "running"
                self._console[key] += "cloud-init: write_files done\n"

        error = None
        if capacity:
            error = {"code": capacity.code, "message": _CAPACITY_MESSAGES[capacity.code]}
        _, headers = self._operation("Microsoft.Compute", finish, error)
        return 201, vm, headers

    def _capacity_error(self, size: str, priority: str) -> _Capacity | None:
        for rule in self._capacity:
            if rule.size in (None, size) and rule.priority in (None, priority):
                return rule
        return None

    def get_vm(self, name: str, expand: str | None) -> dict[str, Any]:
        body = self._get("virtualMachines", name)
        if expand is None:
            return body
        if expand != "instanceView":
            raise _bad(f"The $expand value '{expand}' is not supported here.", "$expand")
        return self._with_instance_view(body)

    def _with_instance_view(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = json.loads(json.dumps(body))
        answer["properties"]["instanceView"] = self.instance_view(body["name"])
        return answer

    def instance_view(self, name: str) -> dict[str, Any]:
        body = self._get("virtualMachines", name)
        provisioning = body["properties"]["provisioningState"]
        statuses = [
            {
                "code": f"ProvisioningState/{provisioning.lower()}",
                "level": "Error" if provisioning == "Failed" else "Info",
                "displayStatus": f"Provisioning {provisioning.lower()}",
                "time": _now(),
            }
        ]
        power = self._power.get(name.lower())
        if power:
            statuses.append(
                {"code": f"PowerState/{power}", "level": "Info", "displayStatus": f"VM {power}"}
            )
        os_disk = body["properties"]["storageProfile"]["osDisk"]
        return {
            "computerName": body["properties"]["osProfile"]["computerName"],
            "osName": "debian",
            "osVersion": "12",
            "disks": [{"name": os_disk["name"], "statuses": statuses[:1]}],
            "statuses": statuses,
        }

    def delete_vm(self, name: str) -> tuple[int, dict[str, str]]:
        key = name.lower()
        body = self._resources.get(("virtualMachines", key))
        if body is None:
            return 204, {}
        body["properties"]["provisioningState"] = "Deleting"

        def finish() -> None:
            vm = self._resources.pop(("virtualMachines", key), None)
            if vm is None:
                return
            self._power.pop(key, None)
            self._console.pop(key, None)
            os_disk = vm["properties"]["storageProfile"]["osDisk"]
            disk_key = ("disks", os_disk["name"].lower())
            if os_disk["deleteOption"] == "Delete":
                self._resources.pop(disk_key, None)
            elif disk_key in self._resources:
                disk = self._resources[disk_key]
                disk.pop("managedBy", None)
                disk["properties"]["diskState"] = "Unattached"
            for reference in vm["properties"]["networkProfile"]["networkInterfaces"]:
                nic_name = self._own(reference["id"], "Microsoft.Network/networkInterfaces")
                nic_key = ("networkInterfaces", (nic_name or "").lower())
                if nic_key not in self._resources:
                    continue
                if reference["properties"]["deleteOption"] == "Delete":
                    self._remove_nic(nic_key)
                else:
                    self._resources[nic_key]["properties"].pop("virtualMachine", None)

        _, headers = self._operation("Microsoft.Compute", finish)
        headers["Location"] = headers["Azure-AsyncOperation"] + "&monitor=true"
        return 202, headers

    def list_vms(self, skip: int, api_version: str) -> dict[str, Any]:
        vms = [
            body for (kind, _), body in sorted(self._resources.items()) if kind == "virtualMachines"
        ]
        page: dict[str, Any] = {"value": vms[skip : skip + self.page_size]}
        if skip + self.page_size < len(vms):
            page["nextLink"] = (
                f"{self.url}{self._rid('Microsoft.Compute/virtualMachines', '').rstrip('/')}"
                f"?api-version={api_version}&$skiptoken={skip + self.page_size}"
            )
        return page

    def boot_diagnostics(self, name: str) -> dict[str, Any]:
        body = self._get("virtualMachines", name)
        diagnostics = body["properties"].get("diagnosticsProfile", {}).get("bootDiagnostics", {})
        if not diagnostics.get("enabled"):
            raise ArmError(
                409,
                "OperationNotAllowed",
                f"Boot diagnostics is not enabled for virtual machine '{name}'.",
            )
        expiry = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        sas = f"sv=2022-11-02&sr=b&sp=r&se={expiry}&sig={self._sas}"
        blob = f"{self.url}/bootdiag/{name.lower()}"
        return {
            "consoleScreenshotBlobUri": f"{blob}/screenshot.bmp?{sas}",
            "serialConsoleLogBlobUri": f"{blob}/serialconsole.log?{sas}",
        }

    # -- resource SKUs -------------------------------------------------------------------

    def list_skus(self, query: dict[str, str]) -> dict[str, Any]:
        """A page of the subscription's Microsoft.Compute SKUs, in one location or all."""
        for name in query:
            if name not in ("api-version", "$filter", "$skiptoken", "includeExtendedLocations"):
                raise _bad(f"The query parameter '{name}' is not supported.", name)
        where = query.get("$filter")
        locations = list(REGIONS)
        if where is not None:
            match = re.fullmatch(r"\s*location\s+eq\s+'([^']*)'\s*", where)
            if match is None:  # what the compute RP says of any other filter
                raise _bad(
                    f"The filter '{where}' is not valid. Only the location filter is supported: "
                    "$filter=location eq '<location>'.",
                    "$filter",
                    "InvalidFilter",
                )
            wanted = match[1].replace(" ", "").lower()
            locations = [location for location in REGIONS if location == wanted]
        skus = [sku for location in locations for sku in self._skus(location)]
        skip = _skip(query)
        page: dict[str, Any] = {"value": skus[skip : skip + self.sku_page_size]}
        if skip + self.sku_page_size < len(skus):
            params = {
                "api-version": query["api-version"],
                "$skiptoken": str(skip + self.sku_page_size),
            }
            if where is not None:
                params["$filter"] = where
            page["nextLink"] = (
                f"{self.url}/subscriptions/{self.subscription}/providers/Microsoft.Compute/skus"
                f"?{_query_string(params)}"
            )
        return page

    def _skus(self, location: str) -> list[dict[str, Any]]:
        """The location's SKUs as ARM lists them: VM sizes among disks and availability sets."""
        sizes = {**SIZES, RESTRICTED_SIZE: _RESTRICTED_SPEC}
        others = [
            _disk_sku(location, "Premium_LRS", "P1", 4),
            _disk_sku(location, "StandardSSD_LRS", "E1", 4),
            {
                "resourceType": "availabilitySets",
                "name": "Aligned",
                "locations": [location],
                "capabilities": [{"name": "MaximumPlatformFaultDomainCount", "value": "3"}],
            },
        ]
        skus = []
        for index, name in enumerate(sorted(sizes)):
            skus.append(_vm_sku(location, name, *sizes[name], restricted=name == RESTRICTED_SIZE))
            if index % 3 == 1 and others:
                skus.append(others.pop())
        return skus + others

    # -- network interfaces and public IPs ---------------------------------------------------

    def put_nic(self, name: str, body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        key = name.lower()
        if ("networkInterfaces", key) in self._resources:
            raise ArmError(409, "OperationNotAllowed", "this stand-in creates NICs, never updates")
        _members(body, "NetworkInterface", required={"location", "properties"},
                 optional={"tags"})  # fmt: skip
        self._check_location(body["location"], "Microsoft.Network/networkInterfaces")
        tags = _tags(body)
        properties = body["properties"]
        _members(properties, "NetworkInterfacePropertiesFormat", required={"ipConfigurations"},
                 optional={"networkSecurityGroup", "enableAcceleratedNetworking"})  # fmt: skip
        configurations = properties["ipConfigurations"]
        if not isinstance(configurations, list) or not configurations:
            raise _bad("A network interface needs at least one IP configuration.",
                       "ipConfigurations")  # fmt: skip
        nic_id = self._rid("Microsoft.Network/networkInterfaces", name)
        answered = []
        for index, configuration in enumerate(configurations):
            _members(configuration, "NetworkInterfaceIPConfiguration",
                     required={"name", "properties"})  # fmt: skip
            ip = configuration["properties"]
            _members(
                ip,
                "NetworkInterfaceIPConfigurationPropertiesFormat",
                required={"subnet"},
                optional={"privateIPAllocationMethod", "publicIPAddress", "primary"},
            )
            subnet = _reference(ip["subnet"], "subnet")
            if subnet.lower() != self.subnet_id.lower():
                raise ArmError(
                    400,
                    "InvalidResourceReference",
                    f"Resource {subnet} referenced by resource {nic_id} was not found. Please "
                    "make sure that the referenced resource exists, and that both resources are "
                    "in the same region.",
                )
            if ip.get("privateIPAllocationMethod", "Dynamic") != "Dynamic":
                raise _bad("Only Dynamic private IP allocation is modelled here.",
                           "privateIPAllocationMethod")  # fmt: skip
            answer = {
                "name": configuration["name"],
                "id": f"{nic_id}/ipConfigurations/{configuration['name']}",
                "properties": {
                    "provisioningState": "Succeeded",
                    "privateIPAddress": f"10.0.0.{4 + len(self._resources) % 250}",
                    "privateIPAllocationMethod": "Dynamic",
                    "subnet": {"id": subnet},
                    "primary": index == 0,
                    "privateIPAddressVersion": "IPv4",
                },
            }
            if "publicIPAddress" in ip:
                answer["properties"]["publicIPAddress"] = {
                    "id": self._attach_ip(
                        _reference(ip["publicIPAddress"], "publicIPAddress"), nic_id
                    )
                }
            answered.append(answer)
        nic: dict[str, Any] = {
            "name": name,
            "id": nic_id,
            "type": "Microsoft.Network/networkInterfaces",
            "location": self.location,
            "properties": {
                "provisioningState": "Updating",
                "resourceGuid": str(uuid.uuid4()),
                "ipConfigurations": answered,
                "enableAcceleratedNetworking": bool(
                    properties.get("enableAcceleratedNetworking", False)
                ),
                "nicType": "Standard",
            },
        }
        if "networkSecurityGroup" in properties:
            nsg = _reference(properties["networkSecurityGroup"], "networkSecurityGroup")
            if not _NSG.match(nsg):
                raise _bad(f"{nsg} is not a network security group id.", "networkSecurityGroup")
            nic["properties"]["networkSecurityGroup"] = {"id": nsg}
        if tags is not None:
            nic["tags"] = tags
        self._resources[("networkInterfaces", key)] = nic

        def finish() -> None:
            nic["properties"]["provisioningState"] = "Succeeded"

        _, headers = self._operation("Microsoft.Network", finish)
        return 201, nic, headers

    def _attach_ip(self, ip_id: str, nic_id: str) -> str:
        name = self._own(ip_id, "Microsoft.Network/publicIPAddresses")
        ip = self._resources.get(("publicIPAddresses", (name or "").lower()))
        if ip is None:
            raise ArmError(
                400,
                "InvalidResourceReference",
                f"Resource {ip_id} referenced by resource {nic_id} was not found.",
            )
        if "ipConfiguration" in ip["properties"]:
            raise _bad(f"Public IP address {ip_id} is already in use.", code="PublicIPAddressInUse")
        ip["properties"]["ipConfiguration"] = {"id": f"{nic_id}/ipConfigurations/ipconfig1"}
        return ip["id"]

    def delete_nic(self, name: str) -> tuple[int, dict[str, str]]:
        key = ("networkInterfaces", name.lower())
        nic = self._resources.get(key)
        if nic is None:
            return 204, {}
        if "virtualMachine" in nic["properties"]:
            raise _bad(
                f"Network Interface {nic['id']} is used by existing resource "
                f"{nic['properties']['virtualMachine']['id']}. In order to delete the network "
                "interface, it must be dissociated from the resource.",
                code="NicInUse",
            )
        _, headers = self._operation("Microsoft.Network", lambda: self._remove_nic(key))
        headers["Location"] = headers["Azure-AsyncOperation"] + "&monitor=true"
        return 202, headers

    def _remove_nic(self, key: tuple[str, str]) -> None:
        nic = self._resources.pop(key, None)
        for configuration in (nic or {}).get("properties", {}).get("ipConfigurations", []):
            ip_id = configuration["properties"].get("publicIPAddress", {}).get("id")
            name = self._own(ip_id or "", "Microsoft.Network/publicIPAddresses")
            ip = self._resources.get(("publicIPAddresses", (name or "").lower()))
            if ip is not None:
                ip["properties"].pop("ipConfiguration", None)

    def put_ip(self, name: str, body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        key = ("publicIPAddresses", name.lower())
        if key in self._resources:
            raise ArmError(409, "OperationNotAllowed", "this stand-in creates IPs, never updates")
        _members(body, "PublicIPAddress", required={"location"},
                 optional={"tags", "sku", "properties", "zones"})  # fmt: skip
        self._check_location(body["location"], "Microsoft.Network/publicIPAddresses")
        tags = _tags(body)
        sku = body.get("sku", {"name": "Standard"})
        _members(sku, "PublicIPAddressSku", required={"name"}, optional={"tier"})
        if sku["name"] not in ("Basic", "Standard"):
            raise _bad(f"Unknown public IP SKU {sku['name']!r}.", "sku.name")
        properties = body.get("properties", {})
        _members(properties, "PublicIPAddressPropertiesFormat",
                 optional={"publicIPAllocationMethod", "publicIPAddressVersion"})  # fmt: skip
        method = properties.get("publicIPAllocationMethod", "Static")
        if method not in ("Static", "Dynamic"):
            raise _bad(f"Unknown allocation method {method!r}.", "publicIPAllocationMethod")
        ip: dict[str, Any] = {
            "name": name,
            "id": self._rid("Microsoft.Network/publicIPAddresses", name),
            "type": "Microsoft.Network/publicIPAddresses",
            "location": self.location,
            "sku": {"name": sku["name"], "tier": "Regional"},
            "properties": {
                "provisioningState": "Updating",
                "ipAddress": f"203.0.113.{1 + len(self._resources) % 250}",
                "publicIPAllocationMethod": method,
                "publicIPAddressVersion": properties.get("publicIPAddressVersion", "IPv4"),
            },
        }
        if tags is not None:
            ip["tags"] = tags
        self._resources[key] = ip

        def finish() -> None:
            ip["properties"]["provisioningState"] = "Succeeded"

        _, headers = self._operation("Microsoft.Network", finish)
        return 201, ip, headers

    def delete_ip(self, name: str) -> tuple[int, dict[str, str]]:
        key = ("publicIPAddresses", name.lower())
        ip = self._resources.get(key)
        if ip is None:
            return 204, {}
        if "ipConfiguration" in ip["properties"]:
            raise _bad(
                f"Public IP address {ip['id']} can not be deleted since it is still allocated "
                f"to resource {ip['properties']['ipConfiguration']['id']}. In order to delete "
                "the public IP, disassociate/detach the Public IP address from the resource.",
                code="PublicIPAddressCannotBeDeleted",
            )
        _, headers = self._operation("Microsoft.Network", lambda: self._resources.pop(key, None))
        headers["Location"] = headers["Azure-AsyncOperation"] + "&monitor=true"
        return 202, headers

    # -- disks ---------------------------------------------------------------------------

    def delete_disk(self, name: str) -> tuple[int, dict[str, str]]:
        key = ("disks", name.lower())
        disk = self._resources.get(key)
        if disk is None:
            return 204, {}
        if disk.get("managedBy"):
            raise ArmError(
                409,
                "OperationNotAllowed",
                f"Disk {name} is attached to VM {disk['managedBy']}.",
            )
        _, headers = self._operation("Microsoft.Compute", lambda: self._resources.pop(key, None))
        headers["Location"] = headers["Azure-AsyncOperation"] + "&monitor=true"
        return 202, headers

    # -- operations ------------------------------------------------------------------------

    def operation(
        self, namespace: str, op_id: str, monitor: bool
    ) -> tuple[int, Any, dict[str, str]]:
        op = self._operations.get(op_id)
        if op is None or op.namespace.lower() != namespace.lower():
            raise ArmError(404, "NotFound", f"The operation {op_id} was not found.")
        retry = {"Retry-After": str(self.retry_after)}
        if monitor:  # the Location protocol: 202 until done
            if op.ended is None:
                return 202, None, retry
            if op.error:
                raise ArmError(400, op.error["code"], op.error["message"])
            return 204, None, {}
        answer: dict[str, Any] = {"name": op.id, "startTime": op.started}
        if op.ended is None:
            answer["status"] = "InProgress"
            return 200, answer, retry
        answer["endTime"] = op.ended
        answer["status"] = "Failed" if op.error else "Succeeded"
        if op.error:
            answer["error"] = op.error
        return 200, answer, {}

    def _check_location(self, location: Any, kind: str) -> None:
        if not isinstance(location, str) or location.replace(" ", "").lower() != self.location:
            raise ArmError(
                400,
                "LocationNotAvailableForResourceType",
                f"The provided location '{location}' is not available for resource type "
                f"'{kind}'. List of available regions for the resource type is "
                f"'{self.location}'.",
            )


def _vm_sku(
    location: str, name: str, vcpus: int, memory: float, *, restricted: bool
) -> dict[str, Any]:
    """A VM size's ResourceSku document: capabilities are name/value strings, GPUs only for
    sizes that have them."""
    family, _, gpus, arm = _SKU_FACTS[name]
    capabilities = {
        "MaxResourceVolumeMB": "0",
        "OSVhdSizeMB": "1047552",
        "vCPUs": str(vcpus),
        "MemoryPreservingMaintenanceSupported": "True",
        "HyperVGenerations": "V2" if arm else "V1,V2",
        "MemoryGB": f"{memory:g}",
        "MaxDataDiskCount": str(min(64, vcpus * 2 + 2)),
        "CpuArchitectureType": "Arm64" if arm else "x64",
        "LowPriorityCapable": "True",
        "PremiumIO": "True",
        "VMDeploymentTypes": "IaaS",
        "vCPUsAvailable": str(vcpus),
        "ACUs": "195",
        "vCPUsPerCore": "1" if arm or gpus else "2",
        "EphemeralOSDiskSupported": "False",
        "AcceleratedNetworkingEnabled": "True",
        "RdmaEnabled": "False",
        "MaxNetworkInterfaces": "2",
    }
    if gpus:
        capabilities["GPUs"] = str(gpus)
    zones = ["1", "2", "3"]
    restrictions: list[dict[str, Any]] = []
    if restricted:
        restrictions = [
            {
                "type": "Location",
                "values": [location],
                "restrictionInfo": {"locations": [location]},
                "reasonCode": "NotAvailableForSubscription",
            },
            {
                "type": "Zone",
                "values": [location],
                "restrictionInfo": {"locations": [location], "zones": zones},
                "reasonCode": "NotAvailableForSubscription",
            },
        ]
    elif gpus:  # the GPU size may be used, but not in zone 3: still offered
        restrictions = [
            {
                "type": "Zone",
                "values": [location],
                "restrictionInfo": {"locations": [location], "zones": ["3"]},
                "reasonCode": "NotAvailableForSubscription",
            }
        ]
    return {
        "resourceType": "virtualMachines",
        "name": name,
        "tier": "Standard",
        "size": name.removeprefix("Standard_"),
        "family": family,
        "locations": [location],
        "locationInfo": [{"location": location, "zones": zones, "zoneDetails": []}],
        "capabilities": [{"name": key, "value": value} for key, value in capabilities.items()],
        "restrictions": restrictions,
    }


def _disk_sku(location: str, name: str, size: str, gib: int) -> dict[str, Any]:
    return {
        "resourceType": "disks",
        "name": name,
        "tier": name.split("_")[0],
        "size": size,
        "locations": [location],
        "capabilities": [
            {"name": "MaxSizeGiB", "value": str(gib)},
            {"name": "MinSizeGiB", "value": "0"},
            {"name": "MaxIOps", "value": "120"},
        ],
        "restrictions": [],
    }


_CAPACITY_MESSAGES = {
    "AllocationFailed": "Allocation failed. We do not have sufficient capacity for the requested "
    "VM size in this region. Read more about improving likelihood of allocation success at "
    "http://aka.ms/allocation-guidance",
    "ZonalAllocationFailed": "Allocation failed. We do not have sufficient capacity for the "
    "requested VM size in this zone. Read more about improving likelihood of allocation "
    "success at http://aka.ms/allocation-guidance",
    "OverconstrainedAllocationRequest": "Allocation failed. VM(s) with the following constraints "
    "cannot be allocated, because the condition is too restrictive. Please remove some "
    "constraints and try again.",
    "SkuNotAvailable": "The requested VM size is currently not available.",
}


@dataclass
class _VmSpec:
    """A VM PUT body, checked as the compute RP checks it."""

    size: str
    priority: str
    image: str
    disk_size: int
    disk_type: str
    disk_name: str | None
    nics: list[str]

    @classmethod
    def read(cls, api: AzureApi, name: str, body: Any) -> _VmSpec:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,62}[A-Za-z0-9_])?", name):
            raise _bad(f"The VM name '{name}' is invalid.", "name", "InvalidResourceName")
        _members(body, "VirtualMachine", required={"location", "properties"},
                 optional={"tags", "identity", "zones"})  # fmt: skip
        api._check_location(body["location"], "Microsoft.Compute/virtualMachines")
        _tags(body)
        if "zones" in body:
            zones = body["zones"]
            if not (isinstance(zones, list) and len(zones) == 1 and zones[0] in ("1", "2", "3")):
                raise _bad(
                    f"The zones {zones!r} are not valid here; one of '1', '2', '3'.", "zones"
                )
        if "identity" in body:
            _check_identity(body["identity"])
        properties = body["properties"]
        _members(properties, "Properties",
                 required={"hardwareProfile", "storageProfile", "osProfile", "networkProfile"},
                 optional={"diagnosticsProfile", "priority", "evictionPolicy",
                           "billingProfile"})  # fmt: skip
        size = _check_size(api, properties["hardwareProfile"])
        image, disk_size, disk_type, disk_name = _check_storage(api, properties["storageProfile"])
        _check_os_profile(properties["osProfile"])
        nics = _check_network(api, properties["networkProfile"])
        priority = _check_priority(properties)
        if "diagnosticsProfile" in properties:
            _members(properties["diagnosticsProfile"], "DiagnosticsProfile",
                     required={"bootDiagnostics"})  # fmt: skip
            boot = properties["diagnosticsProfile"]["bootDiagnostics"]
            _members(boot, "BootDiagnostics", required={"enabled"}, optional={"storageUri"})
            if not isinstance(boot["enabled"], bool):
                raise _bad("bootDiagnostics.enabled must be a boolean.", "bootDiagnostics")
        return cls(size, priority, image, disk_size, disk_type, disk_name, nics)


def _check_size(api: AzureApi, hardware: Any) -> str:
    _members(hardware, "HardwareProfile", required={"vmSize"})
    size = hardware["vmSize"]
    if size not in SIZES:
        raise _bad(
            f"The requested VM size {size} is not available in the current region. The sizes "
            f"available in the current region are: {', '.join(SIZES)}. Find out more on the "
            "available VM sizes in each region at https://aka.ms/azureregions.",
            "vmSize",
        )
    return size


def _check_storage(api: AzureApi, storage: Any) -> tuple[str, int, str, str | None]:
    _members(storage, "StorageProfile", required={"imageReference", "osDisk"})
    _members(storage["imageReference"], "ImageReference", required={"id"})
    image = storage["imageReference"]["id"]
    if not isinstance(image, str) or image.lower() != api.image_id.lower():
        raise _bad(f"The Image '{image}' cannot be found in '{api.location}' region.",
                   "imageReference")  # fmt: skip
    os_disk = storage["osDisk"]
    _members(os_disk, "OSDisk", required={"createOption"},
             optional={"name", "caching", "deleteOption", "diskSizeGB", "managedDisk",
                       "osType"})  # fmt: skip
    if os_disk["createOption"] != "FromImage":
        raise _bad("Only createOption FromImage is modelled here.", "osDisk.createOption")
    if os_disk.get("deleteOption", "Detach") not in ("Delete", "Detach"):
        raise _bad(f"deleteOption {os_disk['deleteOption']!r} is not valid.", "osDisk.deleteOption")
    if os_disk.get("caching", "ReadWrite") not in ("None", "ReadOnly", "ReadWrite"):
        raise _bad(f"caching {os_disk['caching']!r} is not valid.", "osDisk.caching")
    if os_disk.get("osType", "Linux") != "Linux":
        raise _bad("The image is a Linux image.", "osDisk.osType")
    size = os_disk.get("diskSizeGB", IMAGE_SIZE_GB)
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 4095:
        raise _bad(f"diskSizeGB {size!r} is not a size in GB (1-4095).", "osDisk.diskSizeGB")
    if size < IMAGE_SIZE_GB:
        raise _bad(
            f"The specified disk size {size} GB is smaller than the size of the corresponding "
            f"disk in the VM image: {IMAGE_SIZE_GB} GB. This is not allowed. Please choose equal "
            "or greater size or do not specify an explicit size.",
            "osDisk.diskSizeGB",
        )
    disk_type = "Premium_LRS"
    if "managedDisk" in os_disk:
        _members(os_disk["managedDisk"], "ManagedDiskParameters", optional={"storageAccountType"})
        disk_type = os_disk["managedDisk"].get("storageAccountType", disk_type)
        if disk_type not in ("Standard_LRS", "StandardSSD_LRS", "Premium_LRS", "StandardSSD_ZRS"):
            raise _bad(f"storageAccountType {disk_type!r} is not valid.", "managedDisk")
    name = os_disk.get("name")
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", str(name)):
        raise _bad(f"The disk name {name!r} is invalid.", "osDisk.name")
    return image, size, disk_type, name


def _check_os_profile(profile: Any) -> None:
    _members(profile, "OSProfile", required={"computerName", "adminUsername"},
             optional={"adminPassword", "customData", "linuxConfiguration"})  # fmt: skip
    computer = profile["computerName"]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}", str(computer)):
        raise _bad(f"The computer name {computer!r} is invalid.", "computerName")
    user = profile["adminUsername"]
    if not isinstance(user, str) or not 1 <= len(user) <= 64 or user.lower() in _RESERVED_USERS:
        raise _bad(f"The Admin Username specified is not allowed: {user!r}.",
                   "adminUsername", "InvalidParameter")  # fmt: skip
    keys: list[Any] = []
    if "linuxConfiguration" in profile:
        linux = profile["linuxConfiguration"]
        _members(linux, "LinuxConfiguration",
                 optional={"disablePasswordAuthentication", "ssh", "provisionVMAgent"})  # fmt: skip
        if "ssh" in linux:
            _members(linux["ssh"], "SshConfiguration", required={"publicKeys"})
            keys = linux["ssh"]["publicKeys"]
        if linux.get("disablePasswordAuthentication") and not keys:
            raise _bad("An SSH public key is required when password authentication is disabled.",
                       "linuxConfiguration.ssh.publicKeys")  # fmt: skip
    for key in keys:
        _members(key, "SshPublicKey", required={"path", "keyData"})
        if key["path"] != f"/home/{user}/.ssh/authorized_keys":
            raise _bad(
                "Destination path for SSH public keys is currently limited to its default value "
                "due to a known issue in Linux provisioning agent.",
                "linuxConfiguration.ssh.publicKeys.path",
            )
        if not str(key["keyData"]).startswith(("ssh-rsa ", "ssh-ed25519 ")):
            raise _bad("The value of parameter linuxConfiguration.ssh.publicKeys.keyData is "
                       "invalid.", "linuxConfiguration.ssh.publicKeys.keyData")  # fmt: skip
    if not keys and not profile.get("adminPassword"):
        raise _bad("Required parameter 'adminPassword' is missing (null).", "adminPassword")
    if "customData" in profile:
        data = profile["customData"]
        try:
            base64.b64decode(str(data), validate=True)
        except (binascii.Error, ValueError):
            raise _bad("Custom data in OSProfile must be in Base64 encoding.",
                       "customData") from None  # fmt: skip
        if len(data) > 87380:
            raise _bad("Custom data in OSProfile must be at most 87380 characters.", "customData")


def _check_network(api: AzureApi, network: Any) -> list[str]:
    _members(network, "NetworkProfile", required={"networkInterfaces"})
    references = network["networkInterfaces"]
    if not isinstance(references, list) or not references:
        raise _bad("At least one network interface is required.", "networkInterfaces")
    keys = []
    for reference in references:
        _members(reference, "NetworkInterfaceReference", required={"id"}, optional={"properties"})
        properties = reference.get("properties", {})
        _members(properties, "NetworkInterfaceReferenceProperties",
                 optional={"primary", "deleteOption"})  # fmt: skip
        if properties.get("deleteOption", "Detach") not in ("Delete", "Detach"):
            raise _bad(f"deleteOption {properties['deleteOption']!r} is not valid.",
                       "networkInterfaces.deleteOption")  # fmt: skip
        name = api._own(str(reference["id"]), "Microsoft.Network/networkInterfaces")
        nic = api._resources.get(("networkInterfaces", (name or "").lower()))
        if nic is None:
            raise ArmError(
                404,
                "NotFound",
                f"Resource {reference['id']} not found.",
            )
        if "virtualMachine" in nic["properties"]:
            raise _bad(
                f"Network interface {nic['id']} is in use by "
                f"{nic['properties']['virtualMachine']['id']}.",
                code="NicInUse",
            )
        keys.append(nic["name"].lower())
    return keys


def _check_priority(properties: dict[str, Any]) -> str:
    priority = properties.get("priority", "Regular")
    if priority not in ("Regular", "Low", "Spot"):
        raise _bad(f"priority {priority!r} is not valid.", "priority")
    spot = priority in ("Low", "Spot")
    if "evictionPolicy" in properties:
        if not spot:
            raise _bad("Eviction policy can be set only on Azure Spot Virtual Machines.",
                       "evictionPolicy")  # fmt: skip
        if properties["evictionPolicy"] not in ("Deallocate", "Delete"):
            raise _bad(f"evictionPolicy {properties['evictionPolicy']!r} is not valid.",
                       "evictionPolicy")  # fmt: skip
    if "billingProfile" in properties:
        if not spot:
            raise _bad("Max price can be set only on Azure Spot Virtual Machines.",
                       "billingProfile")  # fmt: skip
        _members(properties["billingProfile"], "BillingProfile", required={"maxPrice"})
        price = properties["billingProfile"]["maxPrice"]
        if not isinstance(price, (int, float)) or (price != -1 and price <= 0):
            raise _bad("maxPrice must be -1 or a price above 0.", "billingProfile.maxPrice")
    return "Spot" if spot else "Regular"


def _check_identity(identity: Any) -> None:
    _members(identity, "VirtualMachineIdentity", required={"type"},
             optional={"userAssignedIdentities"})  # fmt: skip
    if identity["type"] != "UserAssigned":
        raise _bad(f"Identity type {identity['type']!r} is not modelled here.", "identity.type")
    assigned = identity.get("userAssignedIdentities")
    if not isinstance(assigned, dict) or not assigned:
        raise _bad("UserAssigned identities need userAssignedIdentities.", "identity")
    for resource_id, value in assigned.items():
        if not _USER_IDENTITY.match(resource_id) or value != {}:
            raise ArmError(
                400,
                "InvalidIdentityFormat",
                f"The identity '{resource_id}' is not a user-assigned identity resource id "
                "mapped to an empty object.",
            )


def _identity_answer(identity: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": identity["type"],
        "userAssignedIdentities": {
            resource_id: {"principalId": str(uuid.uuid4()), "clientId": str(uuid.uuid4())}
            for resource_id in identity["userAssignedIdentities"]
        },
    }


def _members(
    value: Any, where: str, *, required: set[str] = frozenset(), optional: set[str] = frozenset()
) -> None:
    """``value`` is an object with all of ``required`` and nothing beyond ``optional``."""
    if not isinstance(value, dict):
        raise ArmError(400, "InvalidRequestContent",
                       f"The request content was invalid: {where} must be an object.")  # fmt: skip
    for member in value:
        if member not in required and member not in optional:
            raise _unknown(where, member)
    for member in sorted(required - set(value)):
        raise _bad(f"Required parameter '{member}' is missing (null).", member)


def _reference(value: Any, where: str) -> str:
    _members(value, f"{where} (SubResource)", required={"id"})
    if not isinstance(value["id"], str):
        raise _bad(f"{where}.id must be a string.", where)
    return value["id"]


def _tags(body: dict[str, Any]) -> dict[str, str] | None:
    if "tags" not in body:
        return None
    tags = body["tags"]
    if not isinstance(tags, dict) or len(tags) > 50:
        raise _bad("Tags must be an object of at most 50 name/value pairs.", "tags",
                   "InvalidTag")  # fmt: skip
    for name, value in tags.items():
        if not isinstance(value, str) or len(name) > 512 or len(value) > 256:
            raise _bad(f"The tag {name!r} is too long or not a string.", "tags", "InvalidTag")
        if _TAG_NAME_BAD & set(name):
            raise _bad(f"The tag name {name!r} has characters that are not allowed.", "tags",
                       "InvalidTagNameCharacters")  # fmt: skip
    return tags


def _now() -> str:
    # ARM's timestamps: seven digits of fraction and an offset.
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f0+00:00")


# -- HTTP -----------------------------------------------------------------------------------

_ARM = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/(?P<ns>[^/]+)/"
    r"(?P<type>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<action>[^/]+))?)?$",
    re.IGNORECASE,
)
_OPERATION = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/providers/(?P<ns>[^/]+)/locations/(?P<loc>[^/]+)/"
    r"operations/(?P<id>[^/]+)$",
    re.IGNORECASE,
)
_SKUS = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.Compute/skus$", re.IGNORECASE
)
Answer = tuple[int, Any, dict[str, str]]


def _route(api: AzureApi, method: str, path: str, query: dict[str, str], body: Any) -> Answer:
    """One ARM request (its auth and api-version already checked)."""
    if match := _SKUS.match(path):
        _check_subscription(api, match["sub"])
        if method != "GET":
            raise ArmError(405, "MethodNotAllowed", f"{method} is not allowed on skus.")
        return 200, api.list_skus(query), {}
    if match := _OPERATION.match(path):
        _check_subscription(api, match["sub"])
        if method != "GET":
            raise ArmError(405, "MethodNotAllowed", f"{method} is not allowed on operations.")
        return api.operation(match["ns"], match["id"], query.get("monitor") == "true")
    match = _ARM.match(path)
    if match is None:
        raise ArmError(404, "InvalidResourceType", f"No route for '{path}'.")
    _check_subscription(api, match["sub"])
    if match["rg"].lower() != api.resource_group.lower():
        raise ArmError(
            404, "ResourceGroupNotFound", f"Resource group '{match['rg']}' could not be found."
        )
    kind = _KINDS.get((match["ns"].lower(), match["type"].lower()))
    if kind is None:
        raise ArmError(
            400,
            "InvalidResourceType",
            f"The resource type '{match['type']}' could not be found in the namespace "
            f"'{match['ns']}' for api version '{query.get('api-version')}'.",
        )
    short, name, action = kind.split("/")[1], match["name"], match["action"]
    if name is None:
        if short == "virtualMachines" and method == "GET":
            return 200, api.list_vms(_skip(query), query["api-version"]), {}
        raise ArmError(405, "MethodNotAllowed", f"{method} is not allowed on {kind}.")
    if action is not None:
        if short == "virtualMachines" and method == "GET" and action == "instanceView":
            return 200, api.instance_view(name), {}
        if (
            short == "virtualMachines"
            and method == "POST"
            and action == "retrieveBootDiagnosticsData"
        ):
            return 200, api.boot_diagnostics(name), {}
        raise ArmError(404, "NotFound", f"No action '{action}' on {kind} here.")
    if method == "GET":
        if short == "virtualMachines":
            return 200, api.get_vm(name, query.get("$expand")), {}
        return 200, api._get(short, name), {}
    if method == "PUT":
        put = {
            "virtualMachines": api.put_vm,
            "networkInterfaces": api.put_nic,
            "publicIPAddresses": api.put_ip,
        }.get(short)
        if put is None:
            raise ArmError(405, "MethodNotAllowed", f"PUT of {kind} is not modelled here.")
        return put(name, body)
    if method == "DELETE":
        delete = {
            "virtualMachines": api.delete_vm,
            "networkInterfaces": api.delete_nic,
            "publicIPAddresses": api.delete_ip,
            "disks": api.delete_disk,
        }[short]
        status, headers = delete(name)
        return status, None, headers
    raise ArmError(405, "MethodNotAllowed", f"{method} is not allowed on {kind}.")


def _check_subscription(api: AzureApi, subscription: str) -> None:
    if subscription.lower() != api.subscription.lower():
        raise ArmError(
            404, "SubscriptionNotFound", f"The subscription '{subscription}' could not be found."
        )


def _skip(query: dict[str, str]) -> int:
    token = query.get("$skiptoken", "0")
    if not token.isdigit():
        raise _bad(f"The $skiptoken {token!r} is not valid.", "$skiptoken")
    return int(token)


def _handler(api: AzureApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's requests session expects

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._serve("GET")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def _serve(self, method: str) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            split = urlsplit(self.path)
            query = {key: values[-1] for key, values in parse_qs(split.query).items()}
            if split.path == "/msi/token":
                return self._token(method, query)
            if split.path.startswith("/bootdiag/"):
                return self._blob(method, split.path, query)
            try:
                self._check(method, split.path, query)
                body = self._body(method, raw)
                with api._lock:
                    api.requests.append((method, split.path))
                    api._advance()
                    status, answer, headers = _route(api, method, split.path, query, body)
            except ArmError as exc:
                headers = {}
                if exc.status == 401:
                    headers["WWW-Authenticate"] = (
                        'Bearer authorization_uri="https://login.microsoftonline.com/common", '
                        'error="invalid_token", error_description="The authentication failed '
                        "because of missing 'Authorization' header.\""
                    )
                return self._json(exc.status, exc.body(), headers)
            self._json(status, answer, headers)

        def _check(self, method: str, path: str, query: dict[str, str]) -> None:
            authorization = self.headers.get("Authorization")
            if authorization is None:
                raise ArmError(
                    401,
                    "AuthenticationFailed",
                    "Authentication failed. The 'Authorization' header is missing.",
                )
            if authorization != f"Bearer {TOKEN}":
                raise ArmError(401, "InvalidAuthenticationToken",
                               "The access token is invalid.")  # fmt: skip
            version = query.get("api-version")
            if version is None:
                raise ArmError(400, "MissingApiVersionParameter",
                               "The api-version query parameter (?api-version=) is required "
                               "for all requests.")  # fmt: skip
            if not _API_VERSION.match(version):
                raise ArmError(400, "InvalidApiVersionParameter",
                               f"The api-version '{version}' is invalid.")  # fmt: skip

        def _body(self, method: str, raw: bytes) -> Any:
            if method != "PUT":
                return None
            if "application/json" not in (self.headers.get("Content-Type") or ""):
                raise ArmError(
                    415,
                    "UnsupportedMediaType",
                    "The content media type is not supported; use application/json.",
                )
            try:
                return json.loads(raw)
            except ValueError:
                raise ArmError(400, "InvalidRequestContent",
                               "The request content is not valid JSON.") from None  # fmt: skip

        def _token(self, method: str, query: dict[str, str]) -> None:
            """App Service's managed identity protocol (what DefaultAzureCredential speaks
            when IDENTITY_ENDPOINT and IDENTITY_HEADER are set)."""
            if method != "GET" or self.headers.get("X-IDENTITY-HEADER") != api.identity_header:
                return self._json(401, {"statusCode": 401, "message": "bad identity header"})
            if query.get("api-version") != "2019-08-01":
                return self._json(400, {"statusCode": 400, "message": "bad api-version"})
            if query.get("resource", "").rstrip("/") != api.url:
                return self._json(400, {"statusCode": 400, "message": "unknown resource"})
            self._json(200, {
                "access_token": api.issued_token,
                "expires_on": str(int(time.time()) + 3600),
                "resource": query["resource"],
                "token_type": "Bearer",
                "client_id": str(uuid.UUID(int=1)),
            })  # fmt: skip

        def _blob(self, method: str, path: str, query: dict[str, str]) -> None:
            """The serial log blob behind a SAS URL: storage, not ARM, so an ARM bearer
            token sent along is refused (it must not leave ARM)."""
            if self.headers.get("Authorization"):
                return self._json(403, {"error": "an Authorization header was sent to storage"})
            parts = path.split("/")
            if method != "GET" or len(parts) != 4 or query.get("sig") != api._sas:
                return self._json(403, {"error": "AuthenticationFailed"})
            with api._lock:
                text = api._console.get(parts[2])
            if text is None or parts[3] != "serialconsole.log":
                return self._json(404, {"error": "BlobNotFound"})
            self._send(200, text.encode(), {"Content-Type": "text/plain"})

        def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            extra = {"Content-Type": "application/json; charset=utf-8"} if data else {}
            self._send(status, data, {**extra, **(headers or {})})

        def _send(self, status: int, data: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("x-ms-request-id", str(uuid.uuid4()))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


# -- the Azure Retail Prices API (prices.azure.com) -------------------------------------------

PRICES_API_VERSIONS = ("2021-10-01-preview", "2023-01-01-preview")
# $filter's fields (as the real list documents them; priceType filters the items' "type")
_PRICE_FIELDS = {
    name.lower(): key
    for name, key in {
        "armRegionName": "armRegionName",
        "location": "location",
        "meterId": "meterId",
        "meterName": "meterName",
        "productId": "productId",
        "skuId": "skuId",
        "productName": "productName",
        "skuName": "skuName",
        "serviceName": "serviceName",
        "serviceId": "serviceId",
        "serviceFamily": "serviceFamily",
        "priceType": "type",
        "armSkuName": "armSkuName",
    }.items()
}
_FILTER_TOKEN = re.compile(
    r"\s*(?:(?P<paren>[()])|'(?P<text>(?:[^']|'')*)'|(?P<word>\w+)|(?P<other>\S))"
)


@dataclass
class PriceRequest:
    """A request the price list got: its query, and whether it carried credentials."""

    query: dict[str, list[str]]
    authorized: bool


class RetailPrices:
    """The public price list: no credentials (a request with an ``Authorization`` header is
    refused: a client that sends its ARM token here leaks it); ``$filter`` takes ``eq``,
    ``and``, ``or`` and parentheses over the documented fields (anything else is a 400, as
    ``in (...)`` or an unknown field is for the real one), values case-sensitive from
    2023-01-01-preview on; ``page_size`` items a page, then ``NextPageLink``."""

    def __init__(self, url: str, *, page_size: int = 4) -> None:
        self.url, self.page_size = url, page_size
        self.items: list[dict[str, Any]] = []
        self.requests: list[PriceRequest] = []
        self._lock = threading.Lock()
        for region in REGIONS:
            for sku in sorted(LINUX_PRICES):
                self._meters(sku, region)

    def add_price(
        self,
        sku: str,
        region: str,
        usd: float,
        *,
        windows: bool = False,
        priority: str = "",
        price_type: str = "Consumption",
        primary: bool = True,
        term: str | None = None,
    ) -> dict[str, Any]:
        """One meter of ``sku`` in ``region``, as the list holds it: Linux pay-as-you-go unless
        ``windows``, a ``priority`` ("Spot", "Low Priority"), another ``price_type``
        ("DevTestConsumption", "Reservation" with a ``term`` such as "1 Year", its price for
        the whole term) or not the ``primary`` meter region."""
        series = _SKU_FACTS[sku][1] if sku in _SKU_FACTS else sku.split("_")[1]
        meter = " ".join([sku.removeprefix("Standard_").replace("_", " "), priority]).strip()
        product = f"Virtual Machines {series} Series" + (" Windows" if windows else "")
        key = f"{product}/{meter}/{region}/{price_type}/{term}/{primary}"
        product_id = "DZH318Z0" + uuid.uuid5(uuid.NAMESPACE_URL, product).hex[:4].upper()
        item: dict[str, Any] = {"currencyCode": "USD", "tierMinimumUnits": 0.0}
        if term:
            item["reservationTerm"] = term
        item.update({
            "retailPrice": usd,
            "unitPrice": usd,
            "armRegionName": region,
            "location": REGIONS.get(region, region),
            "effectiveStartDate": "2024-05-01T00:00:00Z",
            "meterId": str(uuid.uuid5(uuid.NAMESPACE_URL, key)),
            "meterName": meter,
            "productId": product_id,
            "skuId": f"{product_id}/{uuid.uuid5(uuid.NAMESPACE_URL, meter).hex[:4].upper()}",
            "productName": product,
            "skuName": meter,
            "serviceName": "Virtual Machines",
            "serviceId": "DZH313Z7MMC8",
            "serviceFamily": "Compute",
            "unitOfMeasure": "1 Hour",
            "type": price_type,
            "isPrimaryMeterRegion": primary,
            "armSkuName": sku,
        })  # fmt: skip
        if price_type == "Consumption" and not priority:  # 2023-01-01-preview's savings plans
            item["savingsPlan"] = [
                {"unitPrice": round(usd * 0.44, 6), "retailPrice": round(usd * 0.44, 6),
                 "term": "3 Years"},
                {"unitPrice": round(usd * 0.66, 6), "retailPrice": round(usd * 0.66, 6),
                 "term": "1 Year"},
            ]  # fmt: skip
        with self._lock:
            self.items.append(item)
        return item

    def withdraw_price(self, sku: str, region: str) -> None:
        """The list has no Linux pay-as-you-go meter of ``sku`` in ``region`` any more (its
        decoys stay)."""
        with self._lock:
            self.items = [
                item
                for item in self.items
                if not (item["armSkuName"] == sku and item["armRegionName"] == region
                        and _linux_pay_as_you_go(item))
            ]  # fmt: skip

    def _meters(self, sku: str, region: str) -> None:
        """What the real list holds for a size: the Linux pay-as-you-go meter among its
        decoys."""
        linux = round(LINUX_PRICES[sku] * _REGION_FACTOR[region], 4)
        windows = round(linux + 0.046 * (SIZES.get(sku) or _RESTRICTED_SPEC)[0], 4)
        arm = _SKU_FACTS[sku][3]
        self.add_price(sku, region, round(linux * 0.12, 4), priority="Spot")
        if not arm:  # no Windows on arm sizes
            self.add_price(sku, region, windows, windows=True)
            self.add_price(sku, region, round(windows * 0.12, 4), windows=True, priority="Spot")
            self.add_price(sku, region, linux, windows=True, price_type="DevTestConsumption")
        self.add_price(sku, region, linux)
        self.add_price(sku, region, round(linux * 8760 * 0.62, 2), price_type="Reservation",
                       term="1 Year")  # fmt: skip
        self.add_price(sku, region, round(linux * 0.2, 4), priority="Low Priority")
        self.add_price(sku, region, round(linux * 1.08, 4), primary=False)
        self.add_price(sku, region, round(linux * 26280 * 0.4, 2), price_type="Reservation",
                       term="3 Years")  # fmt: skip

    def answer(
        self, method: str, path: str, raw_query: str, authorization: str | None
    ) -> tuple[int, dict[str, Any]]:
        """(status, JSON) for one request."""
        query = parse_qs(raw_query, keep_blank_values=True)
        with self._lock:
            self.requests.append(PriceRequest(query, authorization is not None))
        if authorization is not None:
            return _price_error(
                401, "an Authorization header was sent to the public price list (it takes none)"
            )
        if path != "/api/retail/prices":
            return _price_error(404, f"No route for '{path}'.", code="NotFound")
        if method != "GET":
            return _price_error(405, f"{method} is not allowed.", code="MethodNotAllowed")
        try:
            return 200, self._page(query)
        except ValueError as exc:
            return _price_error(400, f"Invalid OData parameters supplied: {exc}")

    def _page(self, query: dict[str, list[str]]) -> dict[str, Any]:
        known = ("api-version", "$filter", "$skip", "currencyCode", "meterRegion")
        for name, values in query.items():
            if name not in known:
                raise ValueError(f"unknown query parameter {name!r}")
            if len(values) != 1:
                raise ValueError(f"{name} given {len(values)} times")
        params = {name: values[0] for name, values in query.items()}
        version = params.get("api-version")
        if version is not None and version not in PRICES_API_VERSIONS:
            raise ValueError(f"api-version {version!r} is not supported")
        if params.get("currencyCode", "'USD'") != "'USD'":
            raise ValueError("this list holds USD prices only")
        if params.get("meterRegion", "'primary'") != "'primary'":
            raise ValueError("meterRegion takes 'primary'")
        skip = params.get("$skip", "0")
        if not skip.isdigit():
            raise ValueError(f"$skip {skip!r} is not a number")
        test = _price_filter(
            params.get("$filter", ""), case_sensitive=version == "2023-01-01-preview"
        )
        with self._lock:
            items = [
                item
                for item in self.items
                if test(item) and (item["isPrimaryMeterRegion"] or "meterRegion" not in params)
            ]
        start, end = int(skip), int(skip) + self.page_size
        link = None
        if end < len(items):
            rest = {name: value for name, value in params.items() if name != "$skip"}
            # The real list names its port in these links (https://prices.azure.com:443/...).
            rest["$skip"] = str(end)
            link = f"{self.url}/api/retail/prices?{_query_string(rest)}"
        page = items[start:end]
        return {
            "BillingCurrency": "USD",
            "CustomerEntityId": "Default",
            "CustomerEntityType": "Retail",
            "Items": page,
            "NextPageLink": link,
            "Count": len(page),
        }


def _linux_pay_as_you_go(item: dict[str, Any]) -> bool:
    return (
        item["type"] == "Consumption"
        and "Windows" not in item["productName"]
        and not item["skuName"].endswith((" Spot", " Low Priority"))
    )


def _query_string(params: dict[str, str]) -> str:
    # As the real links read: $filter, $skip and quotes as they are, spaces as %20.
    return urlencode(params, quote_via=quote, safe="$'")


def _price_error(status: int, message: str, *, code: str = "BadRequest") -> tuple[int, Any]:
    return status, {"Error": {"Code": code, "Message": message}}


def _price_filter(text: str, *, case_sensitive: bool) -> Callable[[dict[str, Any]], bool]:
    """``text`` (OData: eq, and, or, parentheses) as a test of an item."""
    tokens: list[tuple[str, str]] = []
    for match in _FILTER_TOKEN.finditer(text):
        kind = match.lastgroup or "other"
        if kind == "other":
            raise ValueError(f"unexpected {match[kind]!r} in $filter")
        value = match[kind]
        tokens.append((kind, value.replace("''", "'") if kind == "text" else value))
    if not tokens:
        return lambda item: True
    at = 0

    def take(kind: str, value: str) -> bool:
        nonlocal at
        if at < len(tokens) and tokens[at] == (kind, value):
            at += 1
            return True
        return False

    def either() -> Callable[[dict[str, Any]], bool]:
        tests = [both()]
        while take("word", "or"):
            tests.append(both())
        return lambda item: any(test(item) for test in tests)

    def both() -> Callable[[dict[str, Any]], bool]:
        tests = [one()]
        while take("word", "and"):
            tests.append(one())
        return lambda item: all(test(item) for test in tests)

    def one() -> Callable[[dict[str, Any]], bool]:
        nonlocal at
        if take("paren", "("):
            test = either()
            if not take("paren", ")"):
                raise ValueError("a '(' in $filter is not closed")
            return test
        if at + 3 > len(tokens):
            raise ValueError("$filter ends too soon")
        (kind, field_name), (_, operator), (value_kind, value) = tokens[at : at + 3]
        at += 3
        key = _PRICE_FIELDS.get(field_name.lower()) if kind == "word" else None
        if key is None:
            raise ValueError(f"cannot filter on {field_name!r}")
        if operator != "eq" or value_kind != "text":
            raise ValueError(f"only {field_name} eq '<value>' is supported here")
        if case_sensitive:
            return lambda item: item.get(key) == value
        return lambda item: str(item.get(key, "")).lower() == value.lower()

    test = either()
    if at != len(tokens):
        raise ValueError(f"unexpected {tokens[at][1]!r} in $filter")
    return test


def _prices_handler(api: AzureApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            split = urlsplit(self.path)
            status, body = api.prices.answer(
                method, split.path, split.query, self.headers.get("Authorization")
            )
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


class _TlsServer(ThreadingHTTPServer):
    """TLS per connection, in the connection's own thread (a slow handshake never holds up
    the accept loop)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, context: ssl.SSLContext) -> None:
        super().__init__(address, handler)
        self._context = context

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            wrapped = self._context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # a client that does not trust the certificate: nothing to answer
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up mid-request


def _tls_context(directory: Path) -> ssl.SSLContext:
    """A throwaway CA (written to ``ca.pem``, what clients trust) and a certificate for
    127.0.0.1 it signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "azure-api stand-in CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    key_file = directory / "server.key"
    key_file.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "server.pem", key_file)
    return context
