"""A PEP 503 simple index of small pure-Python test wheels, built locally without network.

    root = build_index(Path(tmp))                 # DEFAULT_SET, ~20 ``rvm-*`` projects
    with HttpFileServer(root) as http:
        index_url = f"{http.url}/simple"          # for pip/uv ``--index-url``

Wheels are written as zips directly (METADATA, WHEEL, RECORD with sha256), with
fixed timestamps so the same spec always gives byte-identical wheels and hashes.
Each project page also carries PEP 658 metadata (``<wheel>.metadata``), as PyPI
does, so resolvers read dependencies without downloading wheels.

``python -m devtools.wheel_index [DIR]`` builds the default set, serves it and
prints the index URL until Ctrl-C.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import re
import sys
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

TAG = "py3-none-any"
# Zip's earliest representable time: a fixed stamp keeps wheels reproducible.
_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class WheelSpec:
    """One wheel: ``requires`` are PEP 508 strings; ``module_code`` is the body of the
    importable module named after the project (default: ``VALUE`` plus imports of its
    requirements, so importing it proves they were installed too)."""

    name: str
    version: str
    requires: tuple[str, ...] = ()
    module_code: str | None = None

    @property
    def project(self) -> str:
        """The PEP 503 normalized name (``rvm-core``)."""
        return normalize(self.name)

    @property
    def module(self) -> str:
        """The importable module (``rvm_core``)."""
        return self.project.replace("-", "_")

    @property
    def filename(self) -> str:
        return f"{self.module}-{self.version}-{TAG}.whl"


def normalize(name: str) -> str:
    """PEP 503 normalization."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return normalize(re.split(r"[\s\[<>=!~;(]", requirement.strip(), maxsplit=1)[0])


def _spec(name: str, version: str, *requires: str) -> WheelSpec:
    return WheelSpec(name, version, tuple(requires))


# A small graph: rvm-core has three versions and rvm-util's ``<2`` must pick 1.1.0;
# rvm-app pulls in most of the rest transitively.
DEFAULT_SET: tuple[WheelSpec, ...] = (
    _spec("rvm-core", "1.0.0"),
    _spec("rvm-core", "1.1.0"),
    _spec("rvm-core", "2.0.0"),
    _spec("rvm-util", "1.0.0", "rvm-core>=1.1,<2"),
    _spec("rvm-log", "0.3.0", "rvm-core"),
    _spec("rvm-json", "1.2.0"),
    _spec("rvm-yaml", "0.9.0", "rvm-json>=1"),
    _spec("rvm-config", "2.1.0", "rvm-json", "rvm-util"),
    _spec("rvm-http", "1.0.0", "rvm-util", "rvm-log"),
    _spec("rvm-retry", "0.5.0", "rvm-log"),
    _spec("rvm-auth", "1.0.0", "rvm-http", "rvm-config"),
    _spec("rvm-cache", "0.2.0", "rvm-core<2"),
    _spec("rvm-db", "3.0.0", "rvm-cache", "rvm-retry"),
    _spec("rvm-orm", "1.4.0", "rvm-db>=3"),
    _spec("rvm-cli", "0.8.0", "rvm-config", "rvm-log"),
    _spec("rvm-metrics", "1.0.0", "rvm-http"),
    _spec("rvm-trace", "0.1.0", "rvm-metrics", "rvm-log"),
    _spec("rvm-queue", "2.0.0", "rvm-retry", "rvm-json"),
    _spec("rvm-worker", "1.0.0", "rvm-queue", "rvm-db"),
    _spec("rvm-plugin", "0.4.0"),
    _spec("rvm-sdk", "1.0.0", "rvm-auth", "rvm-orm", "rvm-trace"),
    _spec("rvm-app", "1.0.0", "rvm-sdk", "rvm-worker", "rvm-cli", "rvm-yaml"),
)


def project_names(packages: Iterable[WheelSpec] = DEFAULT_SET) -> list[str]:
    """The distinct projects in ``packages``, in first-seen order."""
    return list(dict.fromkeys(spec.project for spec in packages))


def build_index(root: Path, packages: Sequence[WheelSpec] | None = None) -> Path:
    """Write ``packages`` (default ``DEFAULT_SET``) under ``root/simple/<project>/`` with
    each project's ``index.html`` and the root ``simple/index.html``; returns ``root``."""
    packages = DEFAULT_SET if packages is None else packages
    simple = root / "simple"
    by_project: dict[str, list[tuple[str, str, str]]] = {}
    for spec in packages:
        wheel, metadata = build_wheel(spec)
        directory = simple / spec.project
        directory.mkdir(parents=True, exist_ok=True)
        (directory / spec.filename).write_bytes(wheel)
        (directory / f"{spec.filename}.metadata").write_bytes(metadata)
        by_project.setdefault(spec.project, []).append(
            (spec.filename, _sha256(wheel), _sha256(metadata))
        )
    for project, files in by_project.items():
        (simple / project / "index.html").write_text(_project_page(project, files))
    (simple / "index.html").write_text(_root_page(sorted(by_project)))
    return root


def build_wheel(spec: WheelSpec) -> tuple[bytes, bytes]:
    """The wheel's bytes and its METADATA's bytes."""
    dist_info = f"{spec.module}-{spec.version}.dist-info"
    metadata = _metadata(spec).encode()
    files = {
        f"{spec.module}/__init__.py": _module_code(spec).encode(),
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": (
            f"Wheel-Version: 1.0\nGenerator: devtools.wheel_index\n"
            f"Root-Is-Purelib: true\nTag: {TAG}\n"
        ).encode(),
    }
    record_name = f"{dist_info}/RECORD"
    record = "".join(
        f"{path},sha256={_b64_digest(data)},{len(data)}\n" for path, data in files.items()
    )
    files[record_name] = f"{record}{record_name},,\n".encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            info = zipfile.ZipInfo(path, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue(), metadata


def write_requirements(path: Path, names: Iterable[str]) -> Path:
    """A requirements file with one requirement (name, optionally with specifier) a line."""
    path.write_text("".join(f"{name}\n" for name in names))
    return path


def _metadata(spec: WheelSpec) -> str:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {spec.name}",
        f"Version: {spec.version}",
        f"Summary: test wheel {spec.name} {spec.version}",
        "Requires-Python: >=3.8",
        *(f"Requires-Dist: {requirement}" for requirement in spec.requires),
    ]
    return "\n".join(lines) + "\n"


def _module_code(spec: WheelSpec) -> str:
    if spec.module_code is not None:
        return spec.module_code
    imports = "".join(
        f"import {_requirement_name(r).replace('-', '_')}  # noqa: F401\n" for r in spec.requires
    )
    return f'{imports}VALUE = "{spec.project} {spec.version}"\n'


def _project_page(project: str, files: list[tuple[str, str, str]]) -> str:
    links = "".join(
        f'<a href="{html.escape(name)}#sha256={digest}" '
        f'data-requires-python="&gt;=3.8" '
        f'data-dist-info-metadata="sha256={meta}" data-core-metadata="sha256={meta}">'
        f"{html.escape(name)}</a><br/>\n"
        for name, digest, meta in files
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta name="pypi:repository-version" content="1.0">'
        f"<title>Links for {project}</title></head><body>\n"
        f"<h1>Links for {project}</h1>\n{links}</body></html>\n"
    )


def _root_page(projects: list[str]) -> str:
    links = "".join(f'<a href="{p}/">{p}</a><br/>\n' for p in projects)
    return (
        '<!DOCTYPE html>\n<html><head><meta name="pypi:repository-version" content="1.0">'
        f"<title>Simple index</title></head><body>\n{links}</body></html>\n"
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _b64_digest(data: bytes) -> str:
    """RECORD's hash form: urlsafe base64 of the sha256, without padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def main(argv: list[str]) -> int:
    """Build the default set (into ``argv[0]`` or a temp dir), serve it until Ctrl-C."""
    import signal
    import tempfile
    from contextlib import suppress

    from devtools.storage_servers import HttpFileServer

    root = build_index(Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="wheel-index-")))
    with HttpFileServer(root) as http:
        print(f"# wheel index: {root}", flush=True)
        print(f"export UV_INDEX_URL='{http.url}/simple'", flush=True)
        print(f"export PIP_INDEX_URL='{http.url}/simple'", flush=True)
        with suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
