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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from runner.errors import EnvSpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 images: the same parser, from PyPI
    import tomli as tomllib

Kind = Literal["requirements", "pylock", "uv-project"]
_FORMAT = "prefect-vm-runner/senv-1"  # the canonical serialization's marker
_UV_PROJECT_FILES = ("pyproject.toml", "uv.lock")
# The files each kind is made of (what ``write`` puts down).
_KIND_FILES: dict[str, frozenset[str]] = {
    "requirements": frozenset({"requirements.txt"}),
    "pylock": frozenset({"pylock.toml"}),
    "uv-project": frozenset(_UV_PROJECT_FILES),
}

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
# Conda packages with no PyPI equivalent at all: the env cannot be made with uv. The
# CUDA toolkit's conda pieces (cuda-nvcc, cuda-cudart...) are not the PyPI ones, except
# NVIDIA's Python bindings, which PyPI has under the same names.
_CONDA_ONLY = re.compile(
    r"^(r-.*|r|cudatoolkit|cudnn|nccl|cuda-(?!python$|bindings$|core$).*|gdal|proj|geos|"
    r"libgdal.*)$"
)


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
            (directory / name).write_text(text, encoding="utf-8", newline="\n")
        return directory if self.kind == "uv-project" else directory / self.files[0][0]


def load(path: Path) -> EnvSpec:
    """A spec file: Coiled JSON, requirements*.txt / *.in, pylock*.toml, or a
    pyproject.toml (or its directory) with a uv.lock beside it."""
    if path.is_dir():
        return _uv_project(path / "pyproject.toml")
    if not path.is_file():
        raise EnvSpecError(f"environment spec {path} does not exist")
    if path.name in _UV_PROJECT_FILES:
        return _uv_project(path.with_name("pyproject.toml"))
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
    if base in _UV_PROJECT_FILES:
        raise EnvSpecError(
            f"environment spec {name}: a uv project is two files, pyproject.toml and uv.lock; "
            "give the directory that holds both"
        )
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
        return _canonical(name, document)
    if "packages" in document or "lockfile_content" in document or "raw_pip" in document:
        return _coiled(name, document)
    raise EnvSpecError(
        f"environment spec {name} is JSON but not a Coiled SoftwareEnvSpec "
        "(no 'packages', 'raw_pip' or 'lockfile_content')"
    )


def _canonical(name: str, document: dict[str, Any]) -> EnvSpec:
    """Our own serialization (``to_bytes``), checked and normalized as its files would be."""
    kind, python = document.get("kind"), document.get("python")
    try:
        files = {str(file): str(text) for file, text in document.get("files") or []}
    except (TypeError, ValueError):
        raise EnvSpecError(
            f"environment spec {name}: 'files' must be a list of [name, text] pairs"
        ) from None
    if kind not in _KIND_FILES or set(files) != _KIND_FILES[kind]:
        raise EnvSpecError(
            f"environment spec {name}: kind {kind!r} with files {sorted(files)} is not a "
            f"spec the runner writes (kinds: {', '.join(sorted(_KIND_FILES))})"
        )
    if python is not None and not isinstance(python, str):
        raise EnvSpecError(f"environment spec {name}: 'python' must be a string or null")
    if kind == "requirements":
        checked = _requirements(name, files["requirements.txt"])
    elif kind == "pylock":
        checked = _pylock(name, files["pylock.toml"])
    else:
        checked = _uv_project_texts(name, files["pyproject.toml"], files["uv.lock"])
    return EnvSpec(checked.kind, checked.files, python)


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
            lines.append(_requirement_line(name, package_name, specifier))
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
            lines.append(_requirement_line(name, pypi, specifier))
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


def _requirement_line(spec_name: str, name: str, specifier: str) -> str:
    """One requirement, its name normalized so that the same packages give one digest."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    # Coiled writes "", "==1.2", ">=1,<2", or a whole requirement ("name==1.2").
    text = f"{name}{specifier}" if not specifier or specifier[0] in "=<>!~" else specifier
    try:
        requirement = Requirement(text)
    except InvalidRequirement as exc:
        raise EnvSpecError(
            f"environment spec {spec_name}: package {name} has an invalid specifier "
            f"{specifier!r}: {exc}"
        ) from None
    requirement.name = canonicalize_name(requirement.name)
    return str(requirement)


def _requirements(name: str, text: str) -> EnvSpec:
    """requirements.txt: comments and blank lines dropped, lines sorted (order does not
    matter to a resolver), so the same requirements always have the same digest."""
    lines = set()
    for number, line in _logical_lines(text):
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


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with comments removed, continuations (a trailing
    backslash) joined and runs of whitespace made one space, as pip reads the file."""
    logical: list[tuple[int, str]] = []
    parts: list[str] = []
    start = 1
    physical = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for number, raw in enumerate(physical, start=1):
        if not parts:
            start = number
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        parts.append(line)
        logical.append((start, " ".join(" ".join(parts).split())))
        parts = []
    if parts:  # a backslash on the last line continues nothing
        logical.append((start, " ".join(" ".join(parts).split())))
    return logical


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
    read = {path.name: path.read_text(encoding="utf-8") for path in (pyproject, lock)}
    return _uv_project_texts(str(pyproject.parent), read["pyproject.toml"], read["uv.lock"])


def _uv_project_texts(where: str, pyproject: str, lock: str) -> EnvSpec:
    pyproject, lock = (text.replace("\r\n", "\n") for text in (pyproject, lock))
    try:
        project = tomllib.loads(pyproject).get("project", {})
        tomllib.loads(lock)
    except tomllib.TOMLDecodeError as exc:
        raise EnvSpecError(f"environment spec {where}: invalid TOML: {exc}") from None
    files = (("pyproject.toml", pyproject), ("uv.lock", lock))
    return EnvSpec("uv-project", files, project.get("requires-python"))
