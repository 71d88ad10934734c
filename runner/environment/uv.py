"""Build a flow's virtual environment with uv, layered over the runner's own packages.

The env is ``uv venv --system-site-packages`` on the runner's interpreter, plus a
``.pth`` file that adds the runner's site-packages after the env's own: the
flow imports the env's packages first, and the runner and Prefect stay
importable in the same interpreter. Prefect's dependency closure is shared, not
reinstalled (``uv pip install --excludes``): the worker stage runs Prefect's
engine from the runner's site-packages, and two copies of pydantic in one
interpreter cannot work. A spec pin that disagrees with the runner's version
of such a package is reported as a note.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path

from runner.environment.spec import EnvSpec
from runner.errors import EnvBuildError, output_tail
from runner.settings import Settings
from runner.storage import redact

log = logging.getLogger("runner")

# What the worker stage imports besides the flow: it must come from one place.
_SHARED_ROOT = "prefect-vm-runner"
_LAYER_PTH = "_prefect_vm_runner_layer.pth"
_UV_TAIL_LINES = 12
_NAME_LINE = re.compile(r'\s*name\s*=\s*"([^"]+)"')


def runner_site_packages() -> str:
    """Where the runner (and Prefect) are installed: this interpreter's purelib."""
    return sysconfig.get_path("purelib")


def base_python() -> str:
    """The interpreter an env is created on: the base of the runner's venv, if any."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def env_key(spec: EnvSpec) -> str:
    """The cache key: what the env was built from, and what it is layered over (the
    interpreter and the runner's installed distributions, whose names carry versions)."""
    site = runner_site_packages()
    dists = sorted(name for name in os.listdir(site) if name.endswith(".dist-info"))
    material = {
        "spec": spec.digest(),
        "python": base_python(),
        "version": sys.version,
        "runner_site": site,
        "runner_dists": hashlib.sha256("\n".join(dists).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def python_mismatch(spec: EnvSpec) -> str | None:
    """Why this interpreter cannot run ``spec`` (its Python requirement), or None."""
    if not spec.python:
        return None
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        wanted = SpecifierSet(spec.python)
    except InvalidSpecifier:
        return f"the environment's Python requirement {spec.python!r} is not a valid specifier"
    have = platform.python_version()
    if wanted.contains(have, prereleases=True):
        return None
    return (
        f"the environment needs Python {spec.python} but this machine's interpreter "
        f"({base_python()}) is {have}; use an image with a matching Python, or relax the "
        "spec's Python requirement"
    )


def build(spec: EnvSpec, target: Path, *, settings: Settings, say: Callable[[str], None]) -> None:
    """Create the env in ``target`` (an empty, temporary path) and install ``spec`` into it."""
    if problem := python_mismatch(spec):
        raise EnvBuildError(problem)
    started = time.monotonic()
    uv = _uv_binary()
    env = _uv_environment(settings)
    venv = [uv, "venv", "--quiet", "--relocatable", "--system-site-packages"]
    _run(
        [*venv, "--python", base_python(), str(target)],
        env=env,
        doing="creating the venv",
        settings=settings,
    )
    site = _env_site_packages(target)
    # An "import" line runs at start-up: addsitedir (unlike a path line) also reads the
    # runner's own .pth files (an editable install, for one). Appended after the env's
    # site-packages, so the env's pins win for everything not shared.
    (site / _LAYER_PTH).write_text(f"import site; site.addsitedir({runner_site_packages()!r})\n")

    inputs = target / ".spec"
    inputs.mkdir()
    shared = shared_distributions()
    requirements = _requirements_file(spec, inputs, uv=uv, env=env, settings=settings)
    if requirements.suffix == ".toml":
        # uv installs a pylock as locked, ignoring --excludes: drop the shared entries.
        requirements.write_text(_without_packages(requirements.read_text(), set(shared)))
    for note in (*spec.notes, *_pin_conflicts(requirements, shared)):
        say(note)
    excludes = inputs / "shared-with-runner.txt"
    excludes.write_text("".join(f"{name}\n" for name in sorted(shared)))
    say(f"installing with uv ({spec.kind}; {len(shared)} packages shared with the runner)")
    install = [uv, "pip", "install", "--quiet", "--python", str(target / "bin" / "python")]
    install += ["--compile-bytecode", "--requirements", str(requirements)]
    _run([*install, "--excludes", str(excludes)], env=env, doing="installing", settings=settings)
    say(f"environment built in {time.monotonic() - started:.1f}s")


def _requirements_file(
    spec: EnvSpec, directory: Path, *, uv: str, env: dict[str, str], settings: Settings
) -> Path:
    """What ``uv pip install -r`` takes: the spec's requirements or pylock.toml as is; a
    uv project's lock exported to pinned requirements (``uv sync`` would want to own
    the venv and install the project itself)."""
    given = spec.write(directory)
    if spec.kind != "uv-project":
        return given
    exported = directory / "uv-lock-requirements.txt"
    export = [uv, "export", "--quiet", "--frozen", "--no-emit-project", "--no-header"]
    export += ["--format", "requirements-txt", "--project", str(given), "-o", str(exported)]
    _run(export, env=env, doing="reading uv.lock", settings=settings)
    return exported


def _without_packages(pylock: str, names: set[str]) -> str:
    """A pylock.toml without the ``[[packages]]`` entries named in ``names`` (normalized
    names); an entry runs from its ``[[packages]]`` header to the next one, or to the
    next table that is not one of its own (``[packages.*]``, ``[[packages.*]]``)."""
    from packaging.utils import canonicalize_name

    kept: list[str] = []
    block: list[str] | None = None

    def close() -> None:
        if block is None:
            return
        found = [m for m in (_NAME_LINE.match(line) for line in block) if m]
        if not (found and canonicalize_name(found[0].group(1)) in names):
            kept.extend(block)

    for line in pylock.splitlines(keepends=True):
        stripped = line.strip()
        if stripped == "[[packages]]":
            close()
            block = [line]
        elif stripped.startswith("[") and not stripped.startswith(("[packages.", "[[packages.")):
            close()
            block = None
            kept.append(line)
        elif block is not None:
            block.append(line)
        else:
            kept.append(line)
    close()
    return "".join(kept)


@cache
def shared_distributions() -> dict[str, str]:
    """The runner's core dependency closure as installed (normalized name -> version):
    what the worker stage imports, so the env must not install other copies of it."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    shared: dict[str, str] = {}
    todo = [_SHARED_ROOT]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in shared:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional or platform-specific dependency that is not installed
        shared[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            # Core requirements only: extras of a dependency are not installed with it.
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    shared.pop(_SHARED_ROOT, None)
    return shared


def _pin_conflicts(requirements: Path, shared: dict[str, str]) -> list[str]:
    """Notes for spec lines that pin a shared package to a version the runner does not have."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    notes = []
    for raw in _requirement_lines(requirements):
        try:
            requirement = Requirement(raw)
        except InvalidRequirement:
            continue  # not a plain requirement (an option, a URL): uv judges it
        name = canonicalize_name(requirement.name)
        have = shared.get(name)
        if have and requirement.specifier and not requirement.specifier.contains(have, True):
            notes.append(
                f"the environment asks for {requirement.name}{requirement.specifier} but the "
                f"runner's Prefect runs with {name} {have} in the same interpreter; "
                f"using {have}"
            )
    return notes


def _requirement_lines(path: Path) -> list[str]:
    if path.suffix == ".toml":  # pylock.toml: the packages it pins
        from runner.environment.spec import tomllib

        packages = tomllib.loads(path.read_text()).get("packages", [])
        return [f"{p['name']}=={p['version']}" for p in packages if "version" in p]
    lines = []
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-")):
            lines.append(line.rstrip("\\").strip())
    return lines


def _env_site_packages(target: Path) -> Path:
    found = sorted(target.glob("lib/python*/site-packages"))
    if not found:
        raise EnvBuildError(f"uv created no site-packages under {target}")
    return found[0]


def _uv_binary() -> str:
    from uv import find_uv_bin

    return find_uv_bin()


def _uv_environment(settings: Settings) -> dict[str, str]:
    """uv's settings through its environment, never its command line: index URLs may
    hold credentials, and a process's arguments are visible to every user (ps)."""
    env = {**os.environ, "UV_NO_PROGRESS": "1", "UV_PYTHON_DOWNLOADS": "never"}
    env.pop("VIRTUAL_ENV", None)  # the runner's own venv must not be the install target
    # The runner writes only under its workdir; also, a cache on the envs' filesystem
    # lets uv hardlink instead of copy.
    env.setdefault("UV_CACHE_DIR", str(settings.workdir / "cache" / "uv"))
    env.setdefault("UV_CREDENTIALS_DIR", str(settings.workdir / "cache" / "uv-credentials"))
    if settings.index_url:
        env["UV_INDEX_URL"] = settings.index_url
    if settings.extra_index_url:
        env["UV_EXTRA_INDEX_URL"] = settings.extra_index_url
    return env


def _run(command: list[str], *, env: dict[str, str], doing: str, settings: Settings) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = _clean_tail(done.stderr or done.stdout, settings)
        raise EnvBuildError(f"uv failed {doing} (exit {done.returncode}): {tail}")


def _clean_tail(output: str, settings: Settings) -> str:
    """The end of uv's message, on one line, with index credentials removed."""
    text = output_tail(output, _UV_TAIL_LINES) or "no output"
    for url in filter(None, [settings.index_url, *(settings.extra_index_url or "").split()]):
        text = text.replace(url, redact(url))
    # uv may print an index URL in its own normalized form: drop any user:password@.
    return re.sub(r"://[^/\s:@]+:[^/\s@]+@", "://***@", text)
