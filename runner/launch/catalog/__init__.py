"""The packaged instance-type catalog of each cloud (<cloud>.json here), and the choice of
the cheapest types that meet what a flow needs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from runner.errors import ConfigError

# How many types the worker tries, cheapest first, when vm_types is not given.
CHOICES = 3


@dataclass(frozen=True)
class VmType:
    name: str
    vcpus: int
    memory_gib: float
    gpus: int
    arm: bool
    on_demand: float  # USD per hour, list price


def load(cloud: str) -> dict[str, VmType] | None:
    """The cloud's catalog, or None for a provider without one (local)."""
    path = resources.files(__package__) / f"{cloud}.json"
    if not path.is_file():
        return None
    types = json.loads(path.read_text())["types"]
    return {name: VmType(name, **spec) for name, spec in types.items()}


def cheapest(
    catalog: dict[str, VmType],
    *,
    cpu: int | None,
    memory: float | None,
    gpu: bool,
    arm: bool,
    count: int = CHOICES,
) -> list[VmType]:
    """The ``count`` cheapest types with at least ``cpu`` vCPUs and ``memory`` GiB, a GPU
    if and only if ``gpu``, of the ``arm`` architecture or not; ConfigError if none."""
    fits = [
        vm_type
        for vm_type in catalog.values()
        if (cpu is None or vm_type.vcpus >= cpu)
        and (memory is None or vm_type.memory_gib >= memory)
        and (vm_type.gpus > 0) == gpu
        and vm_type.arm == arm
    ]
    if not fits:
        wanted = f"{cpu or 'any'} vCPUs, {memory or 'any'} GiB, gpu={gpu}, arm={arm}"
        raise ConfigError(f"no type in the catalog meets {wanted}; name them in vm_types")
    fits.sort(key=lambda t: (t.on_demand, t.vcpus, t.memory_gib, t.name))
    return fits[:count]
