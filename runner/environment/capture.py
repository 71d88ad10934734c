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
    packages, notes, system = [], [], []
    for package in asyncio.run(scan_prefix(prefix=prefix)):
        name = package["name"]
        if name in (_SELF, "python"):  # the interpreter is pinned below, as Coiled does
            continue
        if package["source"] == "conda" and not _is_python_dist(package.get("path")):
            # A conda env is mostly C libraries (libcurl, aws-c-*, ...): their names
            # mean nothing on PyPI, and the wheels of the Python packages bundle them.
            system.append(package.get("conda_name") or name)
            continue
        if package.get("wheel_target"):
            notes.append(
                f"{name} is installed from a local path ({package['wheel_target']}); "
                "not captured: bundle its code or publish it to your index"
            )
            continue
        if not _is_pep440(package["version"]):
            # Conda builds may carry versions like 1.7.1dev.rapidsai23.04: no pin for uv.
            notes.append(f"{name} {package['version']} has no PEP 440 version; not captured")
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
    if system:
        notes.append(
            f"{len(system)} conda packages without Python metadata (system libraries) "
            f"not captured: {', '.join(sorted(system))}"
        )
    spec = from_bytes("captured.json", json.dumps({"packages": packages}).encode())
    return EnvSpec(spec.kind, spec.files, spec.python, (*notes, *spec.notes))


def _is_python_dist(path: object) -> bool:
    """Whether a scanned conda package installed Python metadata (scan_prefix points
    ``path`` at its .dist-info/.egg-info then, else at any one of its files)."""
    return path is not None and Path(str(path)).suffix in (".dist-info", ".egg-info")


def _is_pep440(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        Version(version)
    except InvalidVersion:
        return False
    return True
