"""Container images of the runner for tests: built with podman, pushed to a local registry."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from devtools.server_process import HOST, ServerProcess

SUITE = "bookworm"
BASE_PACKAGES = ("python3", "ca-certificates")
VENV = "/opt/runner"
ROOTFS_REPO = "localhost/prefect-vm-runner-rootfs"
DEPS_REPO = "localhost/prefect-vm-runner-deps"
IMAGE_REPO = "localhost/prefect-vm-runner-test"
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
# Debian's bundle includes the CAs added on this host (update-ca-certificates): PyPI may
# only be reachable through a proxy that one of them signs for.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Where the build's host files appear inside a RUN step (bind-mounted, never committed).
BUILD_MOUNT = "/run/build"

DEPS_CONTAINERFILE = """\
FROM {base}
COPY requirements.txt /tmp/requirements.txt
RUN export UV_CACHE_DIR={mount}/cache UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never {cert} \\
 && {mount}/uv venv --quiet --python /usr/bin/python3 {venv} \\
 && {mount}/uv pip install --quiet --python {venv}/bin/python --compile-bytecode \\
      -r /tmp/requirements.txt \\
 && rm /tmp/requirements.txt
ENV PATH={venv}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    VIRTUAL_ENV={venv} LANG=C.UTF-8
"""

# The project alone, without its dependencies and offline: the layer that a source
# change rebuilds, in seconds. Only the runner package needs compiling here.
TOP_CONTAINERFILE = """\
FROM {base}
COPY {wheel} /tmp/{wheel}
RUN {mount}/uv pip install --quiet --no-cache --offline --no-deps --link-mode=copy \\
      --python {venv}/bin/python /tmp/{wheel} \\
 && python -m compileall -q {venv}/lib/python3*/site-packages/runner \\
 && rm /tmp/{wheel}
"""


class ImageBuildError(RuntimeError):
    """A tool that builds, moves or runs an image failed; the message has its output."""


def podman_run_flags() -> list[str]:
    """Flags that ``podman run`` (and ``podman build``) needs on these machines.

    - ``--runtime runc``: the runtime these machines are known to work with.
    - ``--ulimit nofile/nproc``: podman asks for limits above this sandbox's hard limits
      by default, which runc may not raise ("error setting rlimit ... operation not
      permitted").
    - ``--network host``: containers reach the test servers on 127.0.0.1.
    """
    return [
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--network",
        "host",
    ]


@functools.cache
def podman_cannot_start() -> str | None:
    """Why podman cannot start a container on this machine, or None when it can.

    Installed is not enough: inside a container without privileges podman is there but
    runc cannot make namespaces or cgroups. The probe is a real container: the host's
    /usr, read-only, over an empty root directory, running ``true`` (0.2 s, no image)."""
    with tempfile.TemporaryDirectory(prefix="podman-probe-") as root:
        for link in ("bin", "lib", "lib64", "sbin"):  # merged /usr (Debian 12, Ubuntu 24.04)
            os.symlink(f"usr/{link}", Path(root, link))
        Path(root, "usr").mkdir()
        argv = [_require("podman"), "run", "--rm", *podman_run_flags(), "-v", "/usr:/usr:ro"]
        try:
            done = subprocess.run(
                [*argv, "--rootfs", root, "/usr/bin/true"],
                capture_output=True,
                text=True,
                timeout=120,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"podman cannot start a container here: {exc}"
    if done.returncode == 0:
        return None
    tail = " | ".join(line for line in (done.stdout + done.stderr).splitlines()[-3:] if line)
    return f"podman cannot start a container here (inside a container without privileges?): {tail}"


def build_runner_image(
    project_dir: Path, *, cache_dir: Path, extras: Sequence[str] = ("s3",)
) -> str:
    """Build (or find) the image of the runner at ``project_dir``; return its reference.

    Three layers, each tagged by a hash of what it is made from, so a warm call only
    hashes: a Debian rootfs from mmdebstrap (its tarball kept in ``cache_dir``), a venv
    at /opt/runner with the project's dependencies (from ``pyproject.toml``, installed
    by uv with the host's uv cache), and the project's own wheel on top.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    for tool in ("podman", "runc", "mmdebstrap"):
        _require(tool)
    uv = _uv_binary()
    with _locked(cache_dir / "build.lock"):
        rootfs = _rootfs_image(cache_dir)
        deps = _deps_image(project_dir, rootfs, uv=uv, extras=extras, scratch=cache_dir)
        return _top_image(project_dir, deps, uv=uv, scratch=cache_dir)


class Registry(ServerProcess):
    """Debian's ``docker-registry`` (distribution 2.x) over plain HTTP on loopback,
    storage in its temp dir. Reference images as ``f"{registry.host}/name:tag"``."""

    name = "docker-registry"
    health_path = "/v2/"

    def __init__(self, *, start_timeout: float = 30.0, directory: Path | None = None) -> None:
        super().__init__(start_timeout=start_timeout, directory=directory)
        self.host = f"{HOST}:{self.port}"
        self.config_path = self.dir / "config.yml"

    def start(self) -> None:
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.dir / "data")},
                "delete": {"enabled": True},
            },
            # A fixed secret only silences the warning about a generated one.
            "http": {"addr": self.host, "secret": "local-test-registry"},
        }
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        super().start()

    def command(self) -> list[str]:
        return [_require("docker-registry"), "serve", str(self.config_path)]

    def env(self) -> dict[str, str]:
        return {}  # clients are given image references, not environment


def push(image: str, registry: Registry, name: str) -> str:
    """Copy ``image`` from podman's local storage to ``registry`` as ``name`` ("repo:tag");
    return the registry's reference to it."""
    reference = f"{registry.host}/{name}"
    _run(
        _require("skopeo"),
        "copy",
        "--quiet",
        "--dest-tls-verify=false",  # the registry speaks plain HTTP
        f"containers-storage:{image}",
        f"docker://{reference}",
    )
    return reference


def pull(reference: str) -> str:
    """``podman pull`` from a local registry (plain HTTP, so no TLS); return the image id."""
    output = _run(_require("podman"), "pull", "--quiet", "--tls-verify=false", reference)
    return output.strip().splitlines()[-1]


def image_id(image: str) -> str | None:
    """The id of a local image, or None when podman has no such image."""
    result = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", image],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() if result.returncode == 0 else None


def debian_sources(paths: Sequence[Path] = APT_SOURCES, *, suite: str = SUITE) -> list[str]:
    """The host's Debian archive entries for ``suite`` (and its -updates, -security), as
    one-line sources; other vendors' repositories are left out. Default: deb.debian.org."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".list", ".sources"))
        elif path.is_file():
            files.append(path)
    lines: list[str] = []
    for file in files:
        parse = _deb822_entries if file.suffix == ".sources" else _one_line_entries
        for uri, suites, components, keyring in parse(file.read_text(errors="replace")):
            if "main" not in components or (keyring and "debian-archive-keyring" not in keyring):
                continue
            for name in suites:
                if name in (suite, f"{suite}-updates", f"{suite}-security"):
                    line = f"deb {uri} {name} main"
                    if line not in lines:
                        lines.append(line)
    return lines or [f"deb http://deb.debian.org/debian {suite} main"]


_Entry = tuple[str, list[str], list[str], str | None]  # uri, suites, components, keyring


def _deb822_entries(text: str) -> Iterator[_Entry]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
            continue
        for uri in fields.get("uris", "").split():
            yield (
                uri,
                fields.get("suites", "").split(),
                fields.get("components", "").split(),
                fields.get("signed-by"),
            )


def _one_line_entries(text: str) -> Iterator[_Entry]:
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 3 or words[0] != "deb":
            continue
        keyring = None
        if words[1].startswith("["):  # options: [arch=amd64 signed-by=/path]
            end = next(i for i, word in enumerate(words) if word.endswith("]"))
            options = " ".join(words[1 : end + 1]).strip("[]").split()
            keyring = next(
                (o.split("=", 1)[1] for o in options if o.startswith("signed-by=")), None
            )
            words = [words[0], *words[end + 1 :]]
        if len(words) >= 4:
            yield words[1], [words[2]], words[3:], keyring


def _rootfs_image(cache_dir: Path) -> str:
    """Debian with Python 3."""
    return debian_image(cache_dir, packages=BASE_PACKAGES, repo=ROOTFS_REPO, name="rootfs")


def debian_image(cache_dir: Path, *, packages: Sequence[str], repo: str, name: str) -> str:
    """Debian (minbase) with ``packages``, imported into podman as ``repo:<key>`` from a
    tarball ``<name>-<key>.tar`` that mmdebstrap made once; the key is a digest of the
    arguments and the mirrors."""
    args = [
        "--variant=minbase",
        f"--include={','.join(packages)}",
        '--aptopt=Acquire::Languages "none"',
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--format=tar",
        SUITE,
    ]
    mirrors = debian_sources()
    key = _digest({"mmdebstrap": args, "mirrors": mirrors})
    tag = f"{repo}:{key}"
    if image_id(tag) is not None:
        return tag
    tarball = cache_dir / f"{name}-{key}.tar"
    if not tarball.exists():
        partial = tarball.with_name(f"{tarball.name}.{os.getpid()}.partial")
        try:
            _run("mmdebstrap", "--quiet", *args, str(partial), *mirrors)
            os.replace(partial, tarball)
        finally:
            partial.unlink(missing_ok=True)
    _run("podman", "import", "--quiet", str(tarball), tag)
    return tag


def _deps_image(
    project_dir: Path, base: str, *, uv: str, extras: Sequence[str], scratch: Path
) -> str:
    """The project's dependencies (not the project) in a venv at /opt/runner."""
    requirements = _requirements(project_dir / "pyproject.toml", extras)
    containerfile = DEPS_CONTAINERFILE.format(
        base=base,
        mount=BUILD_MOUNT,
        venv=VENV,
        cert=f"SSL_CERT_FILE={BUILD_MOUNT}/ca.crt" if HOST_CA_BUNDLE.is_file() else "",
    )
    tag = f"{DEPS_REPO}:{_digest({'requirements': requirements, 'containerfile': containerfile})}"
    if image_id(tag) is not None:
        return tag
    with tempfile.TemporaryDirectory(dir=scratch, prefix="build-deps-") as tmp:
        context, mount = Path(tmp, "context"), Path(tmp, "mount")
        context.mkdir()
        (mount / "cache").mkdir(parents=True)  # where the uv cache is mounted over
        (context / "requirements.txt").write_text("\n".join(requirements) + "\n")
        _place(Path(uv), mount / "uv")
        if HOST_CA_BUNDLE.is_file():
            shutil.copyfile(HOST_CA_BUNDLE, mount / "ca.crt")
        uv_cache = Path(_run(uv, "cache", "dir").strip())
        uv_cache.mkdir(parents=True, exist_ok=True)
        _podman_build(
            context, containerfile, tag, mount, f"--volume={uv_cache}:{BUILD_MOUNT}/cache"
        )
    return tag


def _top_image(project_dir: Path, base: str, *, uv: str, scratch: Path) -> str:
    """The project's wheel, built on the host, installed over the dependencies."""
    with tempfile.TemporaryDirectory(dir=scratch, prefix="build-top-") as tmp:
        context, mount = Path(tmp, "context"), Path(tmp, "mount")
        mount.mkdir()
        # hatchling's wheels are reproducible: the same source gives the same bytes.
        _run(uv, "build", "--quiet", "--wheel", "--out-dir", str(context), str(project_dir))
        (wheel,) = context.glob("*.whl")
        containerfile = TOP_CONTAINERFILE.format(
            base=base, wheel=wheel.name, mount=BUILD_MOUNT, venv=VENV
        )
        wheel_hash = hashlib.sha256(wheel.read_bytes()).hexdigest()
        tag = f"{IMAGE_REPO}:{_digest({'wheel': wheel_hash, 'containerfile': containerfile})}"
        if image_id(tag) is None:
            _place(Path(uv), mount / "uv")
            _podman_build(context, containerfile, tag, mount)
    return tag


def _podman_build(context: Path, containerfile: str, tag: str, mount: Path, *extra: str) -> None:
    (context / "Containerfile").write_text(containerfile)
    _run(
        "podman",
        "build",
        "--quiet",
        "--pull=never",
        "--layers=false",  # one new layer per image; we tag-cache ourselves
        *podman_run_flags(),
        f"--volume={mount}:{BUILD_MOUNT}:ro",
        *extra,
        "--tag",
        tag,
        "--file",
        str(context / "Containerfile"),
        str(context),
    )


def _requirements(pyproject: Path, extras: Sequence[str]) -> list[str]:
    """The project's requirements with ``extras``, self-references (``all``) expanded."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    own_name = canonicalize_name(project["name"])
    requirements: set[str] = set()
    pending, seen = [("", project.get("dependencies", []))], set()
    pending += [(extra, optional[extra]) for extra in extras]
    while pending:
        extra, specs = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for spec in specs:
            requirement = Requirement(spec)
            if canonicalize_name(requirement.name) == own_name:
                pending += [(name, optional[name]) for name in requirement.extras]
            else:
                requirements.add(str(requirement))
    return sorted(requirements)


def _uv_binary() -> str:
    """The uv executable itself (a shell shim, as pyenv's, cannot run in a container)."""
    with contextlib.suppress(ImportError, FileNotFoundError):
        from uv import find_uv_bin

        return find_uv_bin()
    found = shutil.which("uv")
    if found is not None:
        with open(found, "rb") as executable:
            if executable.read(4) == b"\x7fELF":
                return os.path.realpath(found)
        # A shim: uv tells the commands it runs where it is.
        with contextlib.suppress(ImageBuildError):
            real = _run(found, "run", "--no-project", "--", "sh", "-c", 'printf %s "$UV"')
            if real:
                return real
    raise ImageBuildError(
        "no uv executable to mount into the build: install the uv package into this venv "
        "(uv pip install uv)"
    )


def _place(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem
        shutil.copy2(source, target)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One build at a time per cache dir (two test sessions would build the same)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _digest(spec: object) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _require(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise ImageBuildError(f"{tool} not found: apt-get install {tool}")  # same-named package
    return found


def _run(*argv: str) -> str:
    """Run a tool; its stdout, or ImageBuildError with the end of its output."""
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
    ) as proc:
        try:
            stdout, stderr = proc.communicate()
        except BaseException:  # a test timeout, Ctrl-C
            # SIGTERM, not subprocess.run's SIGKILL: mmdebstrap then unmounts /proc and
            # /dev from its chroot, and podman removes its build container.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if proc.returncode != 0:
        output = (stdout + stderr)[-4000:]
        raise ImageBuildError(f"`{' '.join(argv[:2])}` exited {proc.returncode}:\n{output}")
    return stdout
