"""The ``azure`` provider: VMs from the runner's image in one resource group, each with a NIC
and an OS disk of its own, found again by their tags. A VM the runner powers off stays
allocated and billed, so ``delete`` removes it and everything it leaves: NIC, disk, IP."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from runner.errors import BootstrapError, ConfigError, MissingDependency, RunnerError
from runner.launch.providers.base import TAG_POOL, CapacityError, Vm, VmRequest, VmState
from runner.launch.user_data import cloud_config

ARM_ENDPOINT = "https://management.azure.com"
# Another ARM (a sovereign cloud, Azure Stack, a test stand-in); the worker reads it once.
ARM_ENDPOINT_ENV = "RUNNER_AZURE_ARM_ENDPOINT"
INSTALL = "pip install 'prefect-vm-runner[launch-azure]'"
# Between polls of an operation where ARM sends no Retry-After (the SDK's default is 30 s).
POLL_SECONDS = 5
CONSOLE_CHARS = 64 * 1024  # of the serial log's end: the worker quotes its last lines
ADMIN_USER = "runner"  # Azure requires an admin user; nobody can log in as it (see _ssh_key)
DISK_TYPE = "StandardSSD_LRS"  # every size takes it (Premium needs an "s" size)

# ARM's answers that mean "not now, not this size or market": try the next candidate.
CAPACITY_ERRORS = {
    "SkuNotAvailable",
    "AllocationFailed",
    "ZonalAllocationFailed",
    "OverconstrainedAllocationRequest",
    "OverconstrainedZonalAllocationRequest",
}
_IMAGE_ERRORS = {"ImageNotFound", "GalleryImageNotFound", "PlatformImageNotFound"}
_POWER: dict[str, VmState] = {
    "starting": "starting",
    "running": "running",
    "stopping": "stopped",
    "stopped": "stopped",
    "deallocating": "stopped",
    "deallocated": "stopped",
}


class AzureProvider:
    """Azure VMs in one subscription (``project``), resource group and location
    (``region``), through azure-mgmt-compute and azure-mgmt-network. Credentials come from
    DefaultAzureCredential (a managed identity, ``AZURE_CLIENT_ID``/``AZURE_TENANT_ID``/
    ``AZURE_CLIENT_SECRET``, workload identity, ``az login``); ``arm_endpoint`` points it at
    another ARM, whose token audience is ``<endpoint>/.default``."""

    def __init__(
        self,
        *,
        project: str | None = None,
        resource_group: str | None = None,
        region: str | None = None,
        zone: str | None = None,
        subnet: str | None = None,
        security_groups: Sequence[str] | None = None,
        identity: str | None = None,
        arm_endpoint: str | None = None,
        credential: Any | None = None,
        **_: object,
    ) -> None:
        missing = [
            what
            for what, value in (
                ("project (the Azure subscription id)", project),
                ("resource_group", resource_group),
                ("region (the Azure location)", region),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"the azure provider needs {', '.join(missing)}")
        if security_groups and len(security_groups) > 1:
            raise ConfigError(
                "the azure provider takes one network security group id (security_groups)"
            )
        try:
            from azure.mgmt.compute import ComputeManagementClient
            from azure.mgmt.network import NetworkManagementClient
        except ImportError:
            raise MissingDependency(
                f"the azure provider needs azure-mgmt-compute and azure-mgmt-network: {INSTALL}"
            ) from None
        if credential is None:
            credential = default_credential("the azure provider")
        endpoint = (arm_endpoint or ARM_ENDPOINT).rstrip("/")
        options: dict[str, Any] = {
            "base_url": endpoint,
            "credential_scopes": [f"{endpoint}/.default"],
            "polling_interval": POLL_SECONDS,
            # Few retries: a capacity error is answered by trying the next candidate.
            "retry_total": 3,
        }
        self._compute = ComputeManagementClient(credential, project, **options)
        self._network = NetworkManagementClient(credential, project, **options)
        self._subscription = str(project)
        self._endpoint = endpoint
        self._group = str(resource_group)
        self._location = str(region).replace(" ", "").lower()
        self._zone = zone
        self._subnet = subnet
        self._security_group = security_groups[0] if security_groups else None
        self._identity = identity

    def create(self, request: VmRequest) -> Vm:
        if not request.machine_image.lower().startswith("/subscriptions/"):
            raise ConfigError(
                "the azure provider needs machine_image: the runner's image resource id "
                "(/subscriptions/.../providers/Microsoft.Compute/images/...)"
            )
        if not request.vm_type:
            raise ConfigError("the azure provider needs a VM size (vm_types), e.g. Standard_D2s_v5")
        if not self._subnet:
            raise ConfigError("the azure provider needs subnet: the resource id of the VMs' subnet")
        try:
            with self._errors(f"creating the NIC of {request.name}"):
                nic = self._network.network_interfaces.begin_create_or_update(
                    self._group, _nic_name(request.name), self._nic_body(request)
                ).result()
            with self._errors(
                f"starting {request.vm_type}", image=request.machine_image, vm_type=request.vm_type
            ):
                self._compute.virtual_machines.begin_create_or_update(
                    self._group, request.name, self._vm_body(request, nic.id)
                ).result()
        except BaseException:
            # A VM whose allocation failed stays (Failed, with its disk); its NIC stays too.
            self._delete_quietly(request.name)
            raise
        return self.describe(request.name)

    def describe(self, vm_id: str) -> Vm:
        with self._errors(f"describing VM {vm_id}"):
            vm = self._found(
                lambda: self._compute.virtual_machines.get(
                    self._group, vm_id, expand="instanceView"
                )
            )
        if vm is None:
            return Vm(vm_id, "gone")
        view = vm.properties.instance_view
        return _vm(vm, _state(vm.properties.provisioning_state, view.statuses if view else None))

    def delete(self, vm_id: str) -> None:
        """The VM first (its NIC and disk cannot go while it holds them; deleteOption Delete
        removes them with it), then whatever it held that is still there."""
        with self._errors(f"deleting VM {vm_id}"):
            vm = self._found(lambda: self._compute.virtual_machines.get(self._group, vm_id))
            nics, disks = self._held_by(vm_id, vm)
            ips = [ip for group, name in nics for ip in self._public_ips(group, name)]
            if vm is not None:
                self._wait(self._compute.virtual_machines.begin_delete, self._group, vm_id)
            for group, name in nics:
                self._wait(self._network.network_interfaces.begin_delete, group, name)
            for group, name in ips:
                self._wait(self._network.public_ip_addresses.begin_delete, group, name)
            for group, name in disks:
                self._wait(self._compute.disks.begin_delete, group, name)

    def console(self, vm_id: str) -> str:
        try:
            with self._errors(f"reading the serial log of {vm_id}"):
                links = self._compute.virtual_machines.retrieve_boot_diagnostics_data(
                    self._group, vm_id, sas_uri_expiration_time_in_minutes=5
                )
                uri = links.serial_console_log_blob_uri
                return _blob_text(uri)[-CONSOLE_CHARS:] if uri else ""
        except RunnerError:
            return ""

    def list(self, pool: str) -> list[Vm]:
        vms = []
        with self._errors(f"listing the VMs of pool {pool}"):
            for vm in self._compute.virtual_machines.list(self._group):
                if (vm.tags or {}).get(TAG_POOL) != pool:
                    continue
                view = self._found(
                    lambda name=vm.name: self._compute.virtual_machines.instance_view(
                        self._group, name
                    )
                )
                state = _state(vm.properties.provisioning_state, view.statuses if view else None)
                if view is not None and state != "gone":
                    vms.append(_vm(vm, state))
        return vms

    def _nic_body(self, request: VmRequest) -> dict[str, Any]:
        # No public IP: the runner only calls out (Prefect, the bucket), through the subnet's
        # outbound route (a NAT gateway).
        properties: dict[str, Any] = {
            "ipConfigurations": [
                {
                    "name": "ipconfig1",
                    "properties": {
                        "subnet": {"id": self._subnet},
                        "privateIPAllocationMethod": "Dynamic",
                    },
                }
            ]
        }
        if self._security_group:
            properties["networkSecurityGroup"] = {"id": self._security_group}
        return {"location": self._location, "tags": dict(request.tags), "properties": properties}

    def _vm_body(self, request: VmRequest, nic_id: str) -> dict[str, Any]:
        os_disk: dict[str, Any] = {
            "name": _disk_name(request.name),
            "createOption": "FromImage",
            "caching": "ReadWrite",
            "deleteOption": "Delete",
            "managedDisk": {"storageAccountType": DISK_TYPE},
        }
        if request.disk_size_gb:
            os_disk["diskSizeGB"] = request.disk_size_gb
        custom_data = base64.b64encode(cloud_config(request.user_data).encode()).decode()
        properties: dict[str, Any] = {
            "hardwareProfile": {"vmSize": request.vm_type},
            "storageProfile": {
                "imageReference": {"id": request.machine_image},
                "osDisk": os_disk,
            },
            "osProfile": {
                "computerName": request.name,
                "adminUsername": ADMIN_USER,
                "customData": custom_data,
                "linuxConfiguration": {
                    "disablePasswordAuthentication": True,
                    "ssh": {
                        "publicKeys": [
                            {
                                "path": f"/home/{ADMIN_USER}/.ssh/authorized_keys",
                                "keyData": _ssh_key(),
                            }
                        ]
                    },
                },
            },
            "networkProfile": {
                "networkInterfaces": [
                    {"id": nic_id, "properties": {"primary": True, "deleteOption": "Delete"}}
                ]
            },
            # Managed boot diagnostics: the serial log that console() reads.
            "diagnosticsProfile": {"bootDiagnostics": {"enabled": True}},
        }
        if request.spot:
            # Evicted means deleted (nothing left billed); -1: never evicted for price.
            properties["priority"] = "Spot"
            properties["evictionPolicy"] = "Delete"
            properties["billingProfile"] = {"maxPrice": -1}
        body: dict[str, Any] = {
            "location": self._location,
            "tags": dict(request.tags),
            "properties": properties,
        }
        if self._zone:
            body["zones"] = [self._zone]
        if self._identity:
            body["identity"] = {
                "type": "UserAssigned",
                "userAssignedIdentities": {self._identity: {}},
            }
        return body

    def _held_by(
        self, vm_id: str, vm: Any | None
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(resource group, name) of the VM's NICs and OS disk; the names create() gives
        them when the VM itself is gone (its create failed, or a delete was cut short)."""
        if vm is None:
            return [(self._group, _nic_name(vm_id))], [(self._group, _disk_name(vm_id))]
        nics = [
            self._own(reference.id)
            for reference in vm.properties.network_profile.network_interfaces
        ]
        os_disk = vm.properties.storage_profile.os_disk
        managed = os_disk.managed_disk.id if os_disk.managed_disk else None
        disks = [self._own(managed)] if managed else [(self._group, os_disk.name)]
        return [nic for nic in nics if nic], [disk for disk in disks if disk]

    def _public_ips(self, group: str, nic_name: str) -> list[tuple[str, str]]:
        nic = self._found(lambda: self._network.network_interfaces.get(group, nic_name))
        configurations = (nic.properties.ip_configurations or []) if nic else []
        ips = [
            self._own(c.properties.public_ip_address.id)
            for c in configurations
            if c.properties and c.properties.public_ip_address
        ]
        return [ip for ip in ips if ip]

    def _own(self, resource_id: str) -> tuple[str, str] | None:
        """(resource group, name) of a resource of this subscription (the client's only)."""
        from azure.mgmt.core.tools import parse_resource_id

        parts = parse_resource_id(resource_id)
        if str(parts.get("subscription", "")).lower() != self._subscription.lower():
            return None
        return str(parts["resource_group"]), str(parts["name"])

    def _wait(self, begin: Callable[..., Any], group: str, name: str) -> None:
        """Delete and wait until ARM says done (what depends on it cannot go before); an
        answer that it is not there is fine."""
        self._found(lambda: begin(group, name).result())

    def _delete_quietly(self, name: str) -> None:
        # The create's own error is the one to report; the sweep finds a VM left over.
        with suppress(RunnerError):
            self.delete(name)

    @staticmethod
    def _found(call: Callable[[], Any]) -> Any | None:
        """``call()``, or None when ARM says the resource does not exist (but not when its
        resource group or subscription does not: that is bad configuration)."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return call()
        except ResourceNotFoundError as exc:
            if _code(exc) in ("ResourceGroupNotFound", "SubscriptionNotFound"):
                raise
            return None

    @contextmanager
    def _errors(self, doing: str, *, image: str = "", vm_type: str = "") -> Iterator[None]:
        """The Azure SDK's errors as the runner's: capacity, bad input, or arm_errors' rest."""
        from azure.core.exceptions import HttpResponseError

        with arm_errors(doing, subscription=self._subscription, endpoint=self._endpoint):
            try:
                yield
            except HttpResponseError as exc:
                code, message = _code(exc), _message(exc)
                if code in CAPACITY_ERRORS:
                    raise CapacityError(f"{code}: {message}") from None
                why = self._bad_input(exc, image=image, vm_type=vm_type)
                if why:
                    raise ConfigError(f"{doing}: {why} ({code}: {message})") from None
                raise

    def _bad_input(self, exc: Any, *, image: str, vm_type: str) -> str | None:
        """What was wrong with the request, when it was the request (None otherwise)."""
        code = _code(exc)
        target = str(getattr(exc.error, "target", None) or "").lower()
        message = _message(exc).lower()
        if code in _IMAGE_ERRORS or (code == "InvalidParameter" and "imagereference" in target):
            return f"the machine image {image} does not exist in {self._location}"
        if code == "InvalidParameter" and target.endswith("vmsize"):
            return f"there is no VM size {vm_type} in {self._location}"
        if code in ("InvalidResourceReference", "NotFound") and "subnet" in message:
            return f"the subnet {self._subnet} does not exist"
        if code == "ResourceGroupNotFound":
            return f"the resource group {self._group} does not exist"
        if exc.status_code == 400:
            return "Azure refused the request"
        return None


def _state(provisioning: str | None, statuses: Sequence[Any] | None) -> VmState:
    """The VM's state from its provisioning state and its instance view's PowerState."""
    provisioning = (provisioning or "").lower()
    if provisioning == "deleting":
        return "gone"
    codes = [str(status.code or "") for status in statuses or []]
    power = next((c.split("/", 1)[1].lower() for c in codes if c.startswith("PowerState/")), None)
    if power is None:  # still being created, or its allocation failed
        return "stopped" if provisioning == "failed" else "starting"
    return _POWER.get(power, "running")


def _vm(vm: Any, state: VmState) -> Vm:
    properties = vm.properties
    return Vm(
        vm.name,
        state,
        tags=dict(vm.tags or {}),
        created=properties.time_created,
        vm_type=properties.hardware_profile.vm_size if properties.hardware_profile else "",
        spot=properties.priority in ("Spot", "Low"),
    )


def _nic_name(vm_name: str) -> str:
    return f"{vm_name}-nic"


def _disk_name(vm_name: str) -> str:
    return f"{vm_name}-osdisk"


def _ssh_key() -> str:
    """A fresh RSA public key whose private half is never kept: Azure requires a credential
    for a Linux VM's admin user, and this one lets nobody in."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def _blob_text(uri: str) -> str:
    """The serial log blob behind its SAS URL: a plain GET, without the ARM token (storage
    takes the SAS; the token must not leave ARM)."""
    from azure.core import PipelineClient
    from azure.core.rest import HttpRequest

    with PipelineClient(base_url=uri) as client:
        response = client.send_request(HttpRequest("GET", uri))
        response.raise_for_status()
        return response.text()


def default_credential(who: str) -> Any:
    """Azure's DefaultAzureCredential (a managed identity, AZURE_* variables, az login), or
    one MissingDependency line saying how to install it."""
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError:
        raise MissingDependency(f"{who} needs azure-identity: {INSTALL}") from None
    return DefaultAzureCredential()


@contextmanager
def arm_errors(doing: str, *, subscription: str, endpoint: str) -> Iterator[None]:
    """The Azure SDK's errors as one line each, never a token: what the user must fix is a
    ConfigError, ARM failing or not answering is a BootstrapError."""
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
    )

    try:
        yield
    except ClientAuthenticationError as exc:
        if exc.response is None:  # no token: the credential chain found nothing usable
            raise ConfigError(
                f"{doing}: no usable Azure credentials (a managed identity, "
                "AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET, az login): "
                f"{_first_line(exc.message)}"
            ) from None
        raise ConfigError(
            f"{doing}: Azure refused the credentials ({_code(exc)}: {_message(exc)})"
        ) from None
    except HttpResponseError as exc:
        code, message = _code(exc), _message(exc)
        if code in ("SubscriptionNotFound", "InvalidSubscriptionId"):
            raise ConfigError(
                f"{doing}: there is no subscription {subscription} (or the credentials cannot "
                f"see it) ({code})"
            ) from None
        if code in ("AuthorizationFailed", "LinkedAuthorizationFailed"):
            raise ConfigError(
                f"{doing}: the credentials may not do this ({code}: {message})"
            ) from None
        raise BootstrapError(f"{doing}: Azure failed: {code}: {message}") from None
    except ServiceRequestError as exc:  # unreachable, refused, the certificate refused
        raise BootstrapError(
            f"{doing}: cannot reach ARM at {endpoint} (is {ARM_ENDPOINT_ENV} right?): "
            f"{_first_line(str(exc))}"
        ) from None
    except AzureError as exc:
        raise BootstrapError(f"{doing}: {_first_line(str(exc))}") from None


def _code(exc: Any) -> str:
    error = getattr(exc, "error", None)
    return str(getattr(error, "code", None) or getattr(exc, "status_code", None) or "")


def _message(exc: Any) -> str:
    error = getattr(exc, "error", None)
    return " ".join(str(getattr(error, "message", None) or exc.reason or exc).split())


def _first_line(text: str | None) -> str:
    return next((line.strip() for line in (text or "").splitlines() if line.strip()), "")


def from_config(**config: Any) -> AzureProvider:
    # The SDK reads no endpoint of its own from the environment: this is its one setting.
    config.setdefault("arm_endpoint", os.environ.get(ARM_ENDPOINT_ENV) or None)
    return AzureProvider(**config)
