"""Record the current Python environment as a spec, like Coiled's package sync: the
packages this interpreter sees, at their versions, built on ``coiled.scan.scan_prefix``
(which reads installed metadata only, no network)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from runner.environment.spec import EnvSpec, from_bytes
from runner.errors import MissingDependency

_SELF = "prefect-vm-runner"


def capture(prefix: Path | None = None) -> EnvSpec:
    """The environment at ``prefix`` (default: this interpreter's) as a requirements spec
    pinned to the installed versions, with the Python pinned to this minor version.
    Packages installed from a local path (editable, a checkout) are skipped with a note:
    no index has them."""
    try:
        from coiled.scan import scan_prefix
    except ImportError:
        raise MissingDependency(
            "capturing the environment needs coiled; pip install 'prefect-vm-runner[capture]'"
        ) from None
    packages, notes = [], []
    for package in asyncio.run(scan_prefix(prefix=prefix)):
        name = package["name"]
        if name == _SELF:
            continue
        if package.get("wheel_target"):
            notes.append(
                f"{name} is installed from a local path ({package['wheel_target']}); "
                "not captured: bundle its code or publish it to your index"
            )
            continue
        packages.append(
            {
                "name": name,
                "source": package["source"],
                "conda_name": package.get("conda_name"),
                "specifier": f"=={package['version']}",
                "include": True,
            }
        )
    major, minor = sys.version_info[:2]
    packages.append(
        {"name": "python", "source": "conda", "conda_name": "python",
         "specifier": f"=={major}.{minor}.*", "include": True}
    )  # fmt: skip
    spec = from_bytes("captured.json", json.dumps({"packages": packages}).encode())
    return EnvSpec(spec.kind, spec.files, spec.python, (*notes, *spec.notes))
