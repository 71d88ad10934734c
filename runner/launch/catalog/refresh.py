"""``python -m runner launch catalog CLOUD``: re-read each type of a cloud's catalog (and
those named with --add) from the cloud itself, its size from the compute API and its
on-demand Linux price from the cloud's price list, then write the catalog back."""

from __future__ import annotations

import datetime
import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from runner.errors import ConfigError
from runner.launch.catalog import VmType, dump, load, packaged

# cloud -> the module that reads its types (each imports its SDK only when used)
SOURCES = {
    "aws": "runner.launch.catalog.aws_source",
    "gcp": "runner.launch.catalog.gcp_source",
    "azure": "runner.launch.catalog.azure_source",
}


class Source(Protocol):
    """What a cloud's module offers: its default region, and the types it can read."""

    DEFAULT_REGION: str
    ABOUT: str  # what the prices are, for the file's "about"

    def read(self, names: Sequence[str], *, region: str, project: str | None) -> dict[str, VmType]:
        """Each named type the cloud offers in ``region``; the ones it does not are left
        out. ConfigError for what the user must fix (credentials, region, project)."""
        ...


def refresh(
    cloud: str,
    *,
    region: str | None = None,
    project: str | None = None,
    add: Iterable[str] = (),
    drop: Iterable[str] = (),
    out: Path | None = None,
    say: Callable[[str], None] = print,
) -> int:
    """Refresh the catalog at ``out`` (the packaged one by default); says each change."""
    if cloud not in SOURCES:
        raise ConfigError(f"no catalog for {cloud!r}; the clouds with one: {', '.join(SOURCES)}")
    source: Source = importlib.import_module(SOURCES[cloud])  # type: ignore[assignment]
    path = out or packaged(cloud)
    current = load(cloud, path) or load(cloud) or {}
    names = sorted((set(current) | set(add)) - set(drop))
    if not names:
        raise ConfigError(f"the {cloud} catalog would be empty; name types with --add")
    region = region or source.DEFAULT_REGION
    say(f"reading {len(names)} {cloud} types in {region}")
    fresh = source.read(names, region=region, project=project)
    if missing := [name for name in names if name not in fresh]:
        raise ConfigError(
            f"{cloud} offers no {', '.join(missing)} in {region}, or no on-demand price for "
            f"it (a typo? else --drop it); {path} is unchanged"
        )
    changed = [name for name in names if current.get(name) != fresh[name]]
    for name in changed:
        say(f"  {name}: {_change(current.get(name), fresh[name])}")
    today = datetime.datetime.now(datetime.timezone.utc).date()
    about = (
        f"{source.ABOUT}, {region}, read on {today} by `python -m runner launch catalog "
        f"{cloud}`. Types: vCPUs, GiB, NVIDIA GPUs, arm."
    )
    path.write_text(dump({name: fresh[name] for name in names}, about=about))
    say(f"wrote {path}: {len(names)} types, {len(changed)} changed")
    return 0


def _change(before: VmType | None, after: VmType) -> str:
    size = f"{after.vcpus} vCPUs, {after.memory_gib:g} GiB, {after.gpus} GPU"
    size += "" if after.gpus == 1 else "s"
    size += ", arm" if after.arm else ""
    if before is None:
        return f"added ({size}, ${after.on_demand:g}/h)"
    if replace(before, on_demand=after.on_demand) != after:  # its size changed
        return f"now {size}, ${after.on_demand:g}/h"
    return f"${before.on_demand:g}/h -> ${after.on_demand:g}/h"
