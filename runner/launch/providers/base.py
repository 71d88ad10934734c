"""The contract every VM provider keeps (aws, gcp, azure, local), and what it hands back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from runner.errors import BootstrapError

# Tags (labels, on GCE) every VM of a pool carries; the sweep finds a pool's VMs by them.
TAG_POOL = "prefect-vm-runner-pool"
TAG_FLOW_RUN = "prefect-vm-runner-flow-run"
TAG_MAX_RUNTIME = "prefect-vm-runner-max-runtime"
TAG_CLAIM_TIMEOUT = "prefect-vm-runner-claim-timeout"

VmState = Literal["starting", "running", "stopped", "gone"]


class CapacityError(BootstrapError):
    """The cloud has no capacity for this type (or spot market) now: try the next one."""


@dataclass(frozen=True)
class VmRequest:
    """One VM to create: what the worker decided, in the provider's own terms."""

    name: str  # unique, also the cloud's name for it where the cloud has names
    vm_type: str  # an instance type, a machine type, a VM size; "" for local
    spot: bool
    machine_image: str  # AMI, GCE image, Azure image id; a podman image for local
    user_data: Mapping[str, str]  # the runner's KEY=VALUE file (images/README.md)
    tags: Mapping[str, str]  # TAG_* and the user's own
    disk_size_gb: int | None = None
    cpu: float | None = None  # local only: the container's limits
    memory_gib: float | None = None
    gpu: bool = False  # what the type must have; local refuses both
    arm: bool = False


@dataclass(frozen=True)
class Vm:
    """A VM as the provider sees it now."""

    id: str  # the run's infrastructure id
    state: VmState
    tags: Mapping[str, str] = field(default_factory=dict)
    created: datetime | None = None
    vm_type: str = ""
    spot: bool = False


class Provider(Protocol):
    """Where VMs come from. Contract, which tests/launch runs against every provider:

    - ``create`` starts one VM and returns it (state ``starting`` or ``running``); on a
      capacity error (the type or spot market has none now) it raises CapacityError and
      leaves nothing behind; any other failure is a BootstrapError (ConfigError for bad
      input: an unknown type, an image that does not exist, no credentials).
    - ``describe`` says what the VM is now; ``gone`` once it no longer exists.
    - ``delete`` removes the VM and everything created with it that would stay billed
      (its disk, NIC, public IP); deleting one that is gone is not an error. It returns
      when the deletion is requested, not necessarily done.
    - ``console`` is the end of what the VM printed while booting ("" where the cloud
      keeps none).
    - ``list`` gives every VM tagged with ``TAG_POOL`` = ``pool``, in any state.
    Providers hold their SDK clients; they are used from one worker thread at a time.
    """

    def create(self, request: VmRequest) -> Vm: ...

    def describe(self, vm_id: str) -> Vm: ...

    def delete(self, vm_id: str) -> None: ...

    def console(self, vm_id: str) -> str: ...

    def list(self, pool: str) -> list[Vm]: ...
