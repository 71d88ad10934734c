"""The ``gcp`` provider: Compute Engine instances from the runner's image in one project and
zone, the user-data in their metadata, the boot disk deleted with the instance, found again
by their labels."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Any

from runner.errors import BootstrapError, ConfigError, MissingDependency, RunnerError
from runner.launch.providers.base import TAG_POOL, CapacityError, Vm, VmRequest
from runner.launch.user_data import as_env_file

# The instance metadata attribute the image's unit copies to the user-data file
# (images/README.md, "GCE").
USER_DATA_KEY = "prefect-vm-runner-env"
# gcloud's own override of the Compute Engine endpoint (`gcloud config set
# api_endpoint_overrides/compute URL`, as an environment variable): a private endpoint, or
# a stand-in in tests. Its value ends in /compute/v1/, which the SDK adds itself.
ENDPOINT_VARIABLE = "CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
CREDENTIALS = (
    "set GOOGLE_APPLICATION_CREDENTIALS, run `gcloud auth application-default login`, or "
    "run on GCE with a service account"
)
# What the default service account gets when no identity is set: enough to read the
# flow's code and environment from a bucket, as gcloud's default scopes allow.
STORAGE_READ = "https://www.googleapis.com/auth/devstorage.read_only"
OPERATION_SECONDS = 600.0  # an insert GCE has not finished by then is given up

# GCE's answers that mean "not now, not this type or market": try the next candidate. They
# come as an insert operation's error codes, or as the reasons of an HTTP error (camelCase
# there: compared upper snake case). Quotas count: spot and each machine family have their
# own, so the next candidate may fit.
CAPACITY_ERRORS = {
    "ZONE_RESOURCE_POOL_EXHAUSTED",
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
    "QUOTA_EXCEEDED",
}
_STATES = {
    "PROVISIONING": "starting",
    "STAGING": "starting",
    "RUNNING": "running",
    "REPAIRING": "running",
    "STOPPING": "stopped",
    "STOPPED": "stopped",
    "TERMINATED": "stopped",  # what a poweroff from inside leaves: the disk still billed
    "SUSPENDING": "stopped",
    "SUSPENDED": "stopped",
}
_NAME = r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?"
_IMAGE = re.compile(
    rf"(?:(?:.*/)?projects/(?P<project>[^/]+)/)?(?:global/images/)?(?P<family>family/)?"
    rf"(?P<name>{_NAME})"
)
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
_MAX_LABELS = 64


class GcpProvider:
    """Compute Engine in one project and zone, through google-cloud-compute (REST).
    Credentials: Application Default Credentials (the worker VM's service account,
    GOOGLE_APPLICATION_CREDENTIALS, ``gcloud auth application-default login``)."""

    def __init__(
        self,
        *,
        project: str | None = None,
        zone: str | None = None,
        region: str | None = None,
        subnet: str | None = None,
        security_groups: Sequence[str] | None = None,
        identity: str | None = None,
        credentials: Any | None = None,
        api_endpoint: str | None = None,
        **_: object,
    ) -> None:
        if not project:
            raise ConfigError("the gcp provider needs project: the GCP project to start VMs in")
        if not zone:
            raise ConfigError("the gcp provider needs zone: the GCE zone, e.g. us-central1-a")
        zone_region = zone.rsplit("-", 1)[0]
        if region and region != zone_region:
            raise ConfigError(f"the zone {zone} is not in the region {region}")
        if security_groups:
            raise ConfigError(
                "the gcp provider takes no security_groups: GCE applies the firewall rules "
                "of the subnet's network (target them with network tags there)"
            )
        compute = compute_sdk()
        if credentials is None:
            credentials = _default_credentials()
        options = {"api_endpoint": api_endpoint} if api_endpoint else None
        clients = {"credentials": credentials, "transport": "rest", "client_options": options}
        self._compute = compute
        self._instances = compute.InstancesClient(**clients)
        self._operations = compute.ZoneOperationsClient(**clients)
        self._disks = compute.DisksClient(**clients)
        self._machine_types = compute.MachineTypesClient(**clients)
        self._images = compute.ImagesClient(**clients)
        self._project, self._zone, self._region = project, zone, zone_region
        self._subnet = subnet
        self._identity = identity
        self._known_types: set[str] = set()
        self._known_images: dict[str, str] = {}

    def create(self, request: VmRequest) -> Vm:
        if not request.machine_image:
            raise ConfigError(
                "the gcp provider needs machine_image: the runner's GCE image "
                "(projects/P/global/images/NAME, or .../images/family/FAMILY)"
            )
        if not request.vm_type:
            raise ConfigError("the gcp provider needs a machine type (vm_types)")
        source_image = self._check_image(request.machine_image)
        self._check_type(request.vm_type)
        instance = self._instance(request, source_image)
        doing = f"starting {request.vm_type}"
        with self._errors(doing):
            operation = self._instances.insert_unary(
                project=self._project, zone=self._zone, instance_resource=instance
            )
        self._wait(operation, doing=doing, name=request.name)
        return self.describe(request.name)

    def describe(self, vm_id: str) -> Vm:
        from google.api_core.exceptions import NotFound

        with self._errors(f"describing {vm_id}"):
            try:
                instance = self._instances.get(
                    project=self._project, zone=self._zone, instance=vm_id
                )
            except NotFound:
                return Vm(vm_id, "gone")
        return _vm(instance)

    def delete(self, vm_id: str) -> None:
        from google.api_core.exceptions import NotFound

        with self._errors(f"deleting {vm_id}"):
            try:
                self._instances.delete_unary(project=self._project, zone=self._zone, instance=vm_id)
                return  # its boot disk goes with it: auto_delete, set at insert
            except NotFound:
                pass
            # The instance is gone; a boot disk that outlived it (auto_delete off, or an
            # instance deleted with its disk kept) would go on billing. It has its name.
            with suppress(NotFound):
                self._disks.delete_unary(project=self._project, zone=self._zone, disk=vm_id)

    def console(self, vm_id: str) -> str:
        try:
            with self._errors(f"reading the console of {vm_id}"):
                output = self._instances.get_serial_port_output(
                    project=self._project, zone=self._zone, instance=vm_id
                )
        except RunnerError:
            return ""
        return output.contents

    def list(self, pool: str) -> list[Vm]:
        label = label_value(pool)
        request = self._compute.ListInstancesRequest(
            project=self._project, zone=self._zone, filter=f'labels.{TAG_POOL} = "{label}"'
        )
        with self._errors(f"listing the VMs of pool {pool}"):
            instances = list(self._instances.list(request=request))
        # Filtered here too: the pool's label is the sweep's licence to delete.
        return [_vm(i) for i in instances if i.labels.get(TAG_POOL) == label]

    def _instance(self, request: VmRequest, source_image: str) -> Any:
        compute = self._compute
        disk = compute.AttachedDisk(
            boot=True,
            # Deleting the instance deletes its disk: nothing stays billed.
            auto_delete=True,
            initialize_params=compute.AttachedDiskInitializeParams(
                source_image=source_image,
                disk_name=request.name,  # so that delete finds a disk left behind
                disk_type=f"zones/{self._zone}/diskTypes/pd-balanced",
            ),
        )
        if request.disk_size_gb:
            disk.initialize_params.disk_size_gb = request.disk_size_gb
        # No restart after a host failure: the run's runner would start over in it.
        scheduling = compute.Scheduling(automatic_restart=False, provisioning_model="STANDARD")
        if request.spot:
            scheduling.provisioning_model = "SPOT"
            # A preempted VM is deleted, disk and all; the runner reschedules the run.
            scheduling.instance_termination_action = "DELETE"
            scheduling.on_host_maintenance = "TERMINATE"
        elif request.gpu:
            scheduling.on_host_maintenance = "TERMINATE"  # GPU VMs cannot live-migrate
        user_data = compute.Items(key=USER_DATA_KEY, value=as_env_file(request.user_data))
        return compute.Instance(
            name=request.name,
            machine_type=f"zones/{self._zone}/machineTypes/{request.vm_type}",
            disks=[disk],
            metadata=compute.Metadata(items=[user_data]),
            labels=gce_labels(request.tags),
            scheduling=scheduling,
            network_interfaces=[self._network_interface()],
            service_accounts=[self._service_account()],
        )

    def _network_interface(self) -> Any:
        """The subnet's, where one is set: its Cloud NAT (or Private Google Access) is
        the way out, no public IP. Else the default network with an ephemeral public IP
        (released with the instance), as ``gcloud compute instances create`` does."""
        compute = self._compute
        if self._subnet:
            subnetwork = self._subnet
            if "/" not in subnetwork:
                subnetwork = f"regions/{self._region}/subnetworks/{subnetwork}"
            return compute.NetworkInterface(subnetwork=subnetwork)
        return compute.NetworkInterface(
            network="global/networks/default",
            access_configs=[compute.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")],
        )

    def _service_account(self) -> Any:
        """``identity``'s service account, its access governed by IAM alone; without one,
        the project's default compute account reading buckets only."""
        if self._identity:
            return self._compute.ServiceAccount(email=self._identity, scopes=[CLOUD_PLATFORM])
        return self._compute.ServiceAccount(email="default", scopes=[STORAGE_READ])

    def _check_image(self, spec: str) -> str:
        """The image's path for the insert; ConfigError when it does not exist. A typo in
        machine_image is not a capacity problem to fall back from."""
        if spec in self._known_images:
            return self._known_images[spec]
        from google.api_core.exceptions import NotFound

        match = _IMAGE.fullmatch(spec.strip())
        if match is None or ("projects/" in spec and "global/images/" not in spec):
            raise ConfigError(
                f"machine_image {spec!r} is not a GCE image: give projects/P/global/images/"
                "NAME or projects/P/global/images/family/FAMILY"
            )
        project = match["project"] or self._project
        name, family = match["name"], bool(match["family"])
        path = f"projects/{project}/global/images/{'family/' if family else ''}{name}"
        with self._errors("reading the machine image"):
            try:
                if family:
                    self._images.get_from_family(project=project, family=name)
                else:
                    self._images.get(project=project, image=name)
            except NotFound:
                raise ConfigError(
                    f"reading the machine image: the machine image {path} does not exist"
                ) from None
        self._known_images[spec] = path
        return path

    def _check_type(self, vm_type: str) -> None:
        """ConfigError for a machine type this zone does not have (once per type)."""
        if vm_type in self._known_types:
            return
        from google.api_core.exceptions import NotFound

        doing = f"checking machine type {vm_type}"
        with self._errors(doing):
            try:
                self._machine_types.get(
                    project=self._project, zone=self._zone, machine_type=vm_type
                )
            except NotFound:
                raise ConfigError(
                    f"{doing}: there is no machine type {vm_type} in {self._zone}"
                ) from None
        self._known_types.add(vm_type)

    def _wait(self, operation: Any, *, doing: str, name: str) -> None:
        """Until the insert is done; its errors as the runner's. ``wait`` returns when
        the operation is done or after about two minutes, whichever comes first."""
        done = self._compute.Operation.Status.DONE
        deadline = time.monotonic() + OPERATION_SECONDS
        while operation.status != done:
            if time.monotonic() > deadline:
                self._abandon(name)
                raise BootstrapError(
                    f"{doing}: GCE did not finish creating {name} in {OPERATION_SECONDS:g}s; "
                    "its deletion was requested"
                )
            with self._errors(doing):
                operation = self._operations.wait(
                    project=self._project, zone=self._zone, operation=operation.name
                )
        errors = list(operation.error.errors) if operation.error else []
        if not errors:
            return
        codes = [error.code for error in errors]
        message = _one_line(errors[0].message)
        if CAPACITY_ERRORS & set(codes):
            raise CapacityError(f"{next(c for c in codes if c in CAPACITY_ERRORS)}: {message}")
        if any(c.startswith(("INVALID", "RESOURCE_NOT_FOUND")) for c in codes):
            raise ConfigError(f"{doing}: GCE refused the instance ({codes[0]}: {message})")
        raise BootstrapError(f"{doing}: GCE failed: {codes[0]}: {message}")

    def _abandon(self, name: str) -> None:
        """Ask for the deletion of an instance whose insert may still succeed."""
        with suppress(RunnerError):  # else the sweep finds it by its labels
            self.delete(name)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """google-api-core's and google-auth's errors as the runner's: capacity, bad
        input, or google_errors' rest."""
        from google.api_core.exceptions import GoogleAPICallError

        with google_errors(doing, "GCE", ENDPOINT_VARIABLE):
            try:
                yield
            except GoogleAPICallError as exc:
                capacity = CAPACITY_ERRORS & _reasons(exc)
                if capacity:
                    raise CapacityError(f"{sorted(capacity)[0]}: {_message(exc)}") from None
                raise


@contextmanager
def google_errors(doing: str, endpoint: str, variable: str | None) -> Iterator[None]:
    """google-auth's, google-api-core's and requests' errors as the runner's, one line
    each, never a token: what the user must fix is a ConfigError, Google failing or not
    answering is a BootstrapError. ``variable``: the setting that points at ``endpoint``."""
    import requests
    from google.api_core.exceptions import GoogleAPICallError
    from google.auth.exceptions import DefaultCredentialsError, GoogleAuthError, TransportError

    try:
        yield
    except DefaultCredentialsError as exc:
        raise ConfigError(
            f"{doing}: found no usable GCP credentials ({_auth_message(exc)}); {CREDENTIALS}"
        ) from None
    except TransportError as exc:  # the metadata server or token endpoint did not answer
        raise BootstrapError(
            f"{doing}: could not reach Google's auth service: {_auth_message(exc)}"
        ) from None
    except GoogleAuthError as exc:  # refreshing the token failed: the credentials are no good
        raise ConfigError(
            f"{doing}: GCP credentials refused: {_auth_message(exc)}; {CREDENTIALS}"
        ) from None
    except GoogleAPICallError as exc:
        code, message = exc.code, _message(exc)
        if code == 401:
            raise ConfigError(
                f"{doing}: Google refused the credentials: {message}; {CREDENTIALS}"
            ) from None
        if code == 403:
            raise ConfigError(f"{doing}: the credentials may not do this: {message}") from None
        if code in (400, 404, 409):
            raise ConfigError(f"{doing}: Google refused the request: {message}") from None
        raise BootstrapError(f"{doing}: Google failed: {code} {message}") from None
    except requests.RequestException as exc:
        where = f"; check the network or {variable}" if variable else "; check the network"
        raise BootstrapError(
            f"{doing}: could not reach {endpoint} ({type(exc).__name__}){where}"
        ) from None


def _auth_message(exc: Exception) -> str:
    """google-auth's message: its first argument (the others are response objects)."""
    first = exc.args[0] if exc.args else ""
    return _one_line(first if isinstance(first, str) else str(exc))


def gce_labels(tags: Mapping[str, str]) -> dict[str, str]:
    """``tags`` as GCE labels (see ``label_value``); ConfigError past GCE's 64."""
    if len(tags) > _MAX_LABELS:
        raise ConfigError(f"GCE takes at most {_MAX_LABELS} labels; the VM would have {len(tags)}")
    return {_label(key, _LABEL_KEY, key=True): label_value(value) for key, value in tags.items()}


def label_value(value: str) -> str:
    """``value`` as a GCE label value (lowercase letters, digits, ``_``, ``-``; at most 63):
    itself where it is one, else cleaned and suffixed with a digest of the original, so
    that two values never share a label (pools "Prod" and "prod" must not sweep each
    other's VMs). The same value always gives the same label."""
    return _label(value, _LABEL_VALUE, key=False)


def _label(text: str, valid: re.Pattern[str], *, key: bool) -> str:
    if valid.fullmatch(text):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-")
    if key and not cleaned[:1].isalpha():
        cleaned = f"k-{cleaned}".rstrip("-")
    return f"{cleaned[:54]}-{digest}" if cleaned else digest


def _reasons(exc: Any) -> set[str]:
    """The machine-readable reasons of an HTTP error, upper snake case."""
    errors = getattr(exc, "errors", None) or []
    reasons = {str(error.get("reason", "")) for error in errors if isinstance(error, dict)}
    reasons.add(str(getattr(exc, "reason", None) or ""))  # ErrorInfo's, where given
    return {re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", r).upper() for r in reasons if r}


def _message(exc: Any) -> str:
    """The error's own message, without the method and URL google-api-core puts first."""
    return _one_line(re.sub(r"^[A-Z]+ \S+: ", "", exc.message or ""))


def _vm(instance: Any) -> Vm:
    scheduling = instance.scheduling
    return Vm(
        instance.name,
        _STATES.get(instance.status, "running"),  # type: ignore[arg-type]
        tags=dict(instance.labels),
        created=_timestamp(instance.creation_timestamp),
        vm_type=instance.machine_type.rsplit("/", 1)[-1],
        spot=scheduling.provisioning_model == "SPOT" or bool(scheduling.preemptible),
    )


def _timestamp(value: str) -> datetime | None:
    """GCE's RFC 3339 timestamps (milliseconds, an offset)."""
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def compute_sdk(who: str = "the gcp provider") -> Any:
    """google-cloud-compute, or one MissingDependency line saying how to install it."""
    try:
        from google.cloud import compute_v1
    except ImportError:
        raise MissingDependency(
            f"{who} needs google-cloud-compute: pip install 'prefect-vm-runner[launch-gcp]'"
        ) from None
    return compute_v1


def _default_credentials() -> Any:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM])
    except DefaultCredentialsError:
        raise ConfigError(
            "the gcp provider found no GCP credentials: run the worker on a GCE VM with a "
            "service account, set GOOGLE_APPLICATION_CREDENTIALS, or run "
            "gcloud auth application-default login"
        ) from None
    return credentials


def api_endpoint(override: str) -> str:
    """The SDK's endpoint from gcloud's override URL (``https://host/compute/v1/``): the
    SDK adds the API's path itself."""
    return re.sub(r"/compute/[^/]+/?$", "", override.strip()).rstrip("/")


def from_config(**config: Any) -> GcpProvider:
    override = os.environ.get(ENDPOINT_VARIABLE)
    return GcpProvider(api_endpoint=api_endpoint(override) if override else None, **config)
