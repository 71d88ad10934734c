"""The packaged instance-type catalog of each cloud (<cloud>.json here), and the choice of
the cheapest types that meet what a flow needs. ``python -m runner launch catalog CLOUD``
re-reads it from the cloud (runner/launch/catalog/refresh.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

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


def packaged(cloud: str) -> Path:
    """Where the cloud's catalog ships, in this package."""
    return Path(str(resources.files(__package__) / f"{cloud}.json"))


def load(cloud: str, path: Path | None = None) -> dict[str, VmType] | None:
    """The cloud's catalog (the packaged one, or the one at ``path``), or None for a
    provider without one (local)."""
    path = path or packaged(cloud)
    if not path.is_file():
        return None
    types = json.loads(path.read_text())["types"]
    return {name: VmType(name, **spec) for name, spec in types.items()}


def dump(types: dict[str, VmType], *, about: str) -> str:
    """The catalog file's text: one type per line, in name order, so that a refresh's diff
    shows what changed."""
    width = max(len(json.dumps(name)) for name in types) + 1
    lines = [
        f"    {json.dumps(name) + ':':<{width}} "
        + json.dumps({k: v for k, v in asdict(types[name]).items() if k != "name"})
        for name in sorted(types)
    ]
    body = ",\n".join(lines)
    return f'{{\n  "about": {json.dumps(about)},\n  "types": {{\n{body}\n  }}\n}}\n'


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
