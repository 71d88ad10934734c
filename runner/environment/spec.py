"""Software environment specs: the formats a flow's environment may come in, read into one
canonical form that uv installs and that is content-addressed by its sha256.

Formats: a Coiled package-sync ``SoftwareEnvSpec`` (JSON), ``requirements.txt``,
``pylock.toml`` (PEP 751), and a ``pyproject.toml`` with its ``uv.lock``. Index
URLs are never part of a spec: they come from ``--index-url`` so that
credentials never land in a bucket.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomllib

from runner.errors import EnvSpecError

Kind = Literal["requirements", "pylock", "uv-project"]
_FORMAT = "prefect-vm-runner/senv-1"  # the canonical serialization's marker

# Conda packages whose PyPI distribution has another name.
_CONDA_TO_PYPI = {
    "pytorch": "torch",
    "pytorch-cpu": "torch",
    "py-xgboost": "xgboost",
    "py-xgboost-cpu": "xgboost",
    "msgpack-python": "msgpack",
    "matplotlib-base": "matplotlib",
    "pyqt": "PyQt5",
    "python-graphviz": "graphviz",
    "python-kubernetes": "kubernetes",
}
# Conda packages that are not Python packages (the interpreter, system libraries,
# compilers): PyPI wheels carry what they need, so they are dropped with a note.
_CONDA_SYSTEM = re.compile(
    r"^(python|pip|setuptools|wheel|_libgcc_mutex|_openmp_mutex|ca-certificates|openssl|"
    r"certifi|tzdata|ld_impl_linux-64|bzip2|xz|zlib|zstd|lz4-c|ncurses|readline|sqlite|tk|"
    r"libffi|libuuid|libzlib|libsqlite|libnsl|libxcrypt|libexpat|libmpdec|liblzma|"
    r"lib(gcc|gomp|stdcxx|gfortran)[\w-]*|libblas|libcblas|liblapack|mkl|mkl-service|"
    r"intel-openmp|openblas|libopenblas|icu|krb5|c-ares|libcurl|libssh2|libedit|"
    r"keyutils|libev|libnghttp2|gcc|gxx|gfortran|binutils|sysroot_linux-64|"
    r"kernel-headers_linux-64|__[\w-]+)$"
)
# Conda packages with no PyPI equivalent at all: the env cannot be made with uv.
_CONDA_ONLY = re.compile(r"^(r-.*|r|cudatoolkit|cudnn|nccl|cuda-.*|gdal|proj|geos|libgdal.*)$")


@dataclass(frozen=True)
class EnvSpec:
    """What to install: files uv reads, in a canonical form."""

    kind: Kind
    files: tuple[tuple[str, str], ...]  # (file name, text), sorted by name
    python: str | None = None  # a PEP 440 specifier the interpreter must satisfy
    notes: tuple[str, ...] = ()  # lines for the user (conda packages replaced...)

    def digest(self) -> str:
        """sha256 of what gets installed; notes are not part of it."""
        return hashlib.sha256(to_bytes(self)).hexdigest()

    def write(self, directory: Path) -> Path:
        """Write the files into ``directory``; the path uv is given (a file, or for a uv
        project the directory holding both files)."""
        for name, text in self.files:
            (directory / name).write_text(text)
        return directory if self.kind == "uv-project" else directory / self.files[0][0]


def load(path: Path) -> EnvSpec:
    """A spec file: Coiled JSON, requirements*.txt / *.in, pylock*.toml, or a
    pyproject.toml (or its directory) with a uv.lock beside it."""
    if path.is_dir():
        return _uv_project(path / "pyproject.toml")
    if not path.is_file():
        raise EnvSpecError(f"environment spec {path} does not exist")
    if path.name == "pyproject.toml":
        return _uv_project(path)
    return from_bytes(path.name, path.read_bytes())


def from_bytes(name: str, data: bytes) -> EnvSpec:
    """A spec from its bytes; ``name`` tells the format (JSON is sniffed when unclear)."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise EnvSpecError(f"environment spec {name} is not UTF-8 text") from None
    base = Path(name).name
    if base.endswith(".json") or text.lstrip().startswith("{"):
        return _from_json(name, text)
    if base.startswith("pylock") and base.endswith(".toml"):
        return _pylock(name, text)
    if base.endswith(".toml"):
        raise EnvSpecError(
            f"environment spec {name}: a .toml spec must be a pylock.toml, or a "
            "pyproject.toml with its uv.lock beside it"
        )
    return _requirements(name, text)


def find_in(directory: Path) -> EnvSpec | None:
    """A spec inside a code bundle, in this order: pylock.toml, pyproject.toml with
    uv.lock, senv.json (written by ``bundle push --capture``), requirements.txt."""
    if (directory / "pylock.toml").is_file():
        return load(directory / "pylock.toml")
    if (directory / "pyproject.toml").is_file() and (directory / "uv.lock").is_file():
        return load(directory)
    for name in ("senv.json", "requirements.txt"):
        if (directory / name).is_file():
            return load(directory / name)
    return None


def to_bytes(spec: EnvSpec) -> bytes:
    """The canonical serialization (what ``env push`` uploads and ``from_bytes`` reads)."""
    document = {
        "format": _FORMAT,
        "kind": spec.kind,
        "files": [list(item) for item in spec.files],
        "python": spec.python,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


# --- formats ---------------------------------------------------------------------------


def _from_json(name: str, text: str) -> EnvSpec:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise EnvSpecError(f"environment spec {name} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise EnvSpecError(f"environment spec {name} must be a JSON object")
    if document.get("format") == _FORMAT:
        files = tuple(sorted((str(n), str(t)) for n, t in document["files"]))
        return EnvSpec(document["kind"], files, document.get("python"))
    if "packages" in document or "lockfile_content" in document or "raw_pip" in document:
        return _coiled(name, document)
    raise EnvSpecError(
        f"environment spec {name} is JSON but not a Coiled SoftwareEnvSpec "
        "(no 'packages', 'raw_pip' or 'lockfile_content')"
    )


def _coiled(name: str, spec: dict[str, Any]) -> EnvSpec:
    """A Coiled package-sync spec: pip packages as requirements; conda packages as their
    PyPI equivalent where one exists (said in a note); a lock file as its own kind."""
    if spec.get("lockfile_content"):
        lock_name = str(spec.get("lockfile_name") or "")
        lock = spec["lockfile_content"]
        if lock_name.endswith("uv.lock"):
            raise EnvSpecError(
                f"environment spec {name} holds a uv.lock without its pyproject.toml; push "
                "the project directory instead (python -m runner env push pyproject.toml)"
            )
        if Path(lock_name).name.startswith("pylock"):
            return _pylock(f"{name} ({lock_name})", lock)
        return _requirements(f"{name} ({lock_name or 'lockfile'})", lock)
    lines, notes, conda_only = [], [], []
    python = None
    for package in spec.get("packages") or []:
        if package.get("include") is False:
            continue
        package_name = str(package["name"])
        specifier = (package.get("specifier") or "").strip()
        if package.get("source", "pip") == "pip":
            lines.append(_requirement_line(package_name, specifier))
            continue
        conda_name = str(package.get("conda_name") or package_name).lower()
        if conda_name == "python":
            python = specifier or None
        elif _CONDA_ONLY.match(conda_name):
            conda_only.append(conda_name)
        elif _CONDA_SYSTEM.match(conda_name):
            notes.append(f"conda package {conda_name} is not a Python package; not installed")
        else:
            pypi = _CONDA_TO_PYPI.get(conda_name, package_name)
            lines.append(_requirement_line(pypi, specifier))
            if pypi.lower() != conda_name:
                notes.append(f"conda package {conda_name} installed from PyPI as {pypi}")
    if conda_only:
        raise EnvSpecError(
            f"environment spec {name} needs conda packages that have no PyPI equivalent: "
            f"{', '.join(sorted(conda_only))}; use a container image (--image) for them"
        )
    lines += [str(line) for line in spec.get("raw_pip") or []]
    if spec.get("raw_conda"):
        notes.append("the spec's raw_conda section is ignored: the runner installs from PyPI")
    text = "\n".join(lines) + "\n" if lines else ""
    built = _requirements(name, text)
    return EnvSpec(built.kind, built.files, python, tuple(notes))


def _requirement_line(name: str, specifier: str) -> str:
    # Coiled writes "==1.2", ">=1,<2", or a whole requirement ("name==1.2").
    if not specifier or specifier[0] in "=<>!~":
        return f"{name}{specifier}"
    return specifier


def _requirements(name: str, text: str) -> EnvSpec:
    """requirements.txt: comments and blank lines dropped, lines sorted (order does not
    matter to a resolver), so the same requirements always have the same digest."""
    lines = set()
    for number, raw in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        option = line.split()[0].split("=")[0]
        if option in ("-r", "--requirement", "-c", "--constraint"):
            raise EnvSpecError(
                f"environment spec {name} line {number} includes another file ({line}); "
                "inline its requirements, the spec travels alone"
            )
        if option in ("-i", "--index-url", "--extra-index-url", "-f", "--find-links"):
            raise EnvSpecError(
                f"environment spec {name} line {number} names a package index; give indexes "
                "to the runner instead (--index-url, --extra-index-url), so that their "
                "credentials never land in a bucket"
            )
        lines.add(line)
    if not lines:
        raise EnvSpecError(f"environment spec {name} lists no packages")
    return EnvSpec("requirements", (("requirements.txt", "\n".join(sorted(lines)) + "\n"),))


def _pylock(name: str, text: str) -> EnvSpec:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EnvSpecError(f"environment spec {name} is not valid TOML: {exc}") from None
    if "lock-version" not in document:
        raise EnvSpecError(f"environment spec {name} is not a PEP 751 lock (no lock-version)")
    text = text.replace("\r\n", "\n")
    return EnvSpec("pylock", (("pylock.toml", text),), document.get("requires-python"))


def _uv_project(pyproject: Path) -> EnvSpec:
    lock = pyproject.with_name("uv.lock")
    if not pyproject.is_file() or not lock.is_file():
        raise EnvSpecError(
            f"environment spec {pyproject.parent}: a uv project needs both pyproject.toml "
            "and uv.lock (run `uv lock`)"
        )
    text = pyproject.read_text().replace("\r\n", "\n")
    try:
        project = tomllib.loads(text).get("project", {})
        tomllib.loads(lock.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise EnvSpecError(f"environment spec {pyproject.parent}: invalid TOML: {exc}") from None
    files = (("pyproject.toml", text), ("uv.lock", lock.read_text().replace("\r\n", "\n")))
    return EnvSpec("uv-project", files, project.get("requires-python"))
