"""A VM built from images/, stood in for by a container: a Debian rootfs with systemd,
provisioned by images/provision/*.sh as Packer runs them, booted by podman with /sbin/init.

    image = build_vm_image(REPO, cache_dir=CACHE_DIR)
    with Vm(image, user_data={"RUNNER_FLOW_RUN_ID": ..., "PREFECT_API_URL": ...}) as vm:
        boot = vm.boot(timeout=180)
    boot.exit_code, boot.unit_lines(), boot.finished_at - boot.started_at

The container shares the host's network (the Prefect and S3 servers on loopback) and
kernel clock; "powering off" is systemd's poweroff ending the container by itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from devtools.images import (
    BUILD_MOUNT,
    HOST_CA_BUNDLE,
    ImageBuildError,
    _digest,
    _locked,
    _podman_build,
    _require,
    _run,
    _uv_binary,
    debian_image,
    image_id,
    podman_run_flags,
)
from runner.launch.providers.local import parse_podman_time

# What a cloud's Debian 12 image has that matters here: systemd as init, D-Bus, Python.
SYSTEM_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates")
BASE_REPO = "localhost/prefect-vm-runner-vm-base"
VM_REPO = "localhost/prefect-vm-runner-vm"
# Where the Packer templates upload images/ and the wheel (images/packer/*.pkr.hcl).
STAGING = "/tmp/prefect-vm-runner-image"
PROVISION_SCRIPTS = ("base.sh", "nvidia.sh", "runner.sh", "cleanup.sh")  # Packer's order
IMAGE_DIRS = ("provision", "systemd", "files")  # what the scripts read from images/
UNIT = "prefect-vm-runner.service"
USER_DATA_FILE = "/etc/prefect-vm-runner/user-data.env"
# Shared with the container image tests (tests/integration/conftest.py): one build lock,
# and the Debian tarballs survive between sessions as uv's cache does.
CACHE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "prefect-vm-runner"
    / "images"
)

# images/ and the wheel as Packer's file provisioners upload them; the scripts run as root
# with Packer's environment_vars. SSL_CERT_FILE/PIP_CERT (host CAs, mounted for the build
# only, never in the image) let uv and pip reach PyPI through a proxy the host trusts.
VM_CONTAINERFILE = """\
FROM {base}
COPY images {staging}
COPY {wheel} {staging}/{wheel}
RUN export PVR_FILES={staging} PVR_RUNNER_WHEEL={staging}/{wheel} PVR_RUNNER_EXTRAS={extras} \\
      PVR_INDEX_URL={index_url} PVR_GPU=false PVR_PODMAN=false {cert} \\
 && for script in {scripts}; do {staging}/provision/$script || exit 1; done
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
"""


def boot_flags() -> list[str]:
    """``podman run`` flags that boot the image as a VM: the usual ones (runc, ulimits, the
    host's network) and ``--systemd=always``, which gives /sbin/init what systemd needs
    as PID 1 in a container (tmpfs /run, /tmp, /var/log/journal; a writable cgroup tree;
    ``container=podman``; SIGRTMIN+3 as the stop signal); ``--tty``: a console for
    systemd to write to, as a VM's serial console (``podman logs``)."""
    return [*podman_run_flags(), "--systemd=always", "--tty"]


def build_vm_image(
    project_dir: Path,
    *,
    cache_dir: Path,
    extras: Sequence[str] = ("s3",),
    index_url: str = "",
) -> str:
    """Build (or find) the booted-VM image of the checkout at ``project_dir``; its tag.

    Two layers, each tagged by a hash of what it is made from: a Debian rootfs with
    systemd (mmdebstrap, the tarball kept in ``cache_dir``), then images/provision/*.sh
    run in it as root (Packer's order and variables) with a wheel of the checkout. A
    warm call builds the wheel (reproducible: same source, same bytes) and hashes.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    for tool in ("podman", "runc", "mmdebstrap"):
        _require(tool)
    uv = _uv_binary()
    with _locked(cache_dir / "build.lock"):
        base = _system_image(cache_dir)
        return _provisioned_image(
            project_dir, base, uv=uv, extras=extras, index_url=index_url, scratch=cache_dir
        )


def _system_image(cache_dir: Path) -> str:
    """Debian with systemd as /sbin/init and Python."""
    return debian_image(cache_dir, packages=SYSTEM_PACKAGES, repo=BASE_REPO, name="vm-rootfs")


def _provisioned_image(
    project_dir: Path,
    base: str,
    *,
    uv: str,
    extras: Sequence[str],
    index_url: str,
    scratch: Path,
) -> str:
    """images/provision/*.sh run into ``base`` with a wheel of the checkout."""
    with tempfile.TemporaryDirectory(dir=scratch, prefix="build-vm-") as tmp:
        context, mount = Path(tmp, "context"), Path(tmp, "mount")
        mount.mkdir()
        _run(uv, "build", "--quiet", "--wheel", "--out-dir", str(context), str(project_dir))
        (wheel,) = context.glob("*.whl")
        for name in IMAGE_DIRS:
            shutil.copytree(project_dir / "images" / name, context / "images" / name)
        has_ca = HOST_CA_BUNDLE.is_file()
        containerfile = VM_CONTAINERFILE.format(
            base=base,
            staging=STAGING,
            wheel=wheel.name,
            extras=",".join(extras),
            index_url=index_url,
            scripts=" ".join(PROVISION_SCRIPTS),
            cert=(
                f"SSL_CERT_FILE={BUILD_MOUNT}/ca.crt PIP_CERT={BUILD_MOUNT}/ca.crt"
                if has_ca
                else ""
            ),
        )
        key = _digest(
            {
                "containerfile": containerfile,
                "wheel": hashlib.sha256(wheel.read_bytes()).hexdigest(),
                "images": _tree_digest(context / "images"),
            }
        )
        tag = f"{VM_REPO}:{key}"
        if image_id(tag) is None:
            if has_ca:
                shutil.copyfile(HOST_CA_BUNDLE, mount / "ca.crt")
            _podman_build(context, containerfile, tag, mount)
    return tag


def _tree_digest(root: Path) -> str:
    """sha256 over a directory's files: relative path, mode bits that matter, content."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(b"x" if os.access(path, os.X_OK) else b"-")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


class VmTimeout(ImageBuildError):
    """The booted image did not power itself off in time; the message has its console."""


@dataclass
class Boot:
    """One boot of the image, after it powered off: how it ended, when, what it logged."""

    name: str
    exit_code: int
    started_at: datetime  # the container started: /sbin/init's first instant
    finished_at: datetime  # the container ended: systemd's poweroff done
    journal: list[dict] = field(repr=False)  # `journalctl -o json` entries of the boot
    console: str = field(repr=False)  # what systemd wrote to the console (podman logs)

    def unit_lines(self, identifier: str = "prefect-vm-runner") -> list[str]:
        """The messages the unit's processes logged (its SyslogIdentifier), in order."""
        return [message for _, message in self.unit_entries(identifier)]

    def unit_entries(self, identifier: str = "prefect-vm-runner") -> list[tuple[datetime, str]]:
        """``(time journald received it, message)`` for each line the unit logged."""
        return [
            (_from_micros(entry["__REALTIME_TIMESTAMP"]), _message(entry))
            for entry in self.journal
            if entry.get("SYSLOG_IDENTIFIER") == identifier
        ]

    def messages(self) -> list[str]:
        """Every message of the boot (systemd's own included)."""
        return [_message(entry) for entry in self.journal]


class Vm:
    """The image created as a container, its user-data written in as cloud-init would
    have by the time the unit starts; ``boot()`` starts it and waits for its poweroff.

        with Vm(image, user_data={...}) as vm:
            boot = vm.boot(timeout=180)
            data = vm.read_file("/var/lib/...")   # from the powered-off "disk"

    ``user_data``: the KEY=VALUE lines of /etc/prefect-vm-runner/user-data.env (None: no
    file). ``unit_environment``: ``Environment=`` lines of a drop-in for the unit, what
    an image bakes in for settings needed before the user-data arrives (the claim
    timeout). The container is removed when the block ends."""

    def __init__(
        self,
        image: str,
        *,
        user_data: Mapping[str, str] | None = None,
        unit_environment: Mapping[str, str] | None = None,
        scratch: Path | None = None,
    ) -> None:
        self.image = image
        self.name = f"pvr-vm-{uuid.uuid4().hex[:12]}"
        self.user_data = user_data
        self.unit_environment = unit_environment or {}
        self._scratch = scratch
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._podman = "podman"

    def __enter__(self) -> Vm:
        self._podman = _require("podman")
        self._tmp = tempfile.TemporaryDirectory(dir=self._scratch, prefix=f"{self.name}-")
        try:
            self._journal_dir.mkdir()
            _run(
                self._podman,
                "create",
                "--quiet",
                "--name",
                self.name,
                *boot_flags(),
                # The journal outlives the container (podman's default there is a tmpfs).
                f"--volume={self._journal_dir}:/var/log/journal",
                self.image,
                "/sbin/init",
            )
            self._write_files()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        subprocess.run(
            [self._podman, "rm", "--force", "--time", "0", self.name],
            capture_output=True,
            check=False,
        )
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def _dir(self) -> Path:
        assert self._tmp is not None, "use Vm(...) in a with block"
        return Path(self._tmp.name)

    @property
    def _journal_dir(self) -> Path:
        return self._dir / "journal"

    def boot(self, *, timeout: float) -> Boot:
        """Start /sbin/init and wait up to ``timeout`` s for the container to end by
        itself (VmTimeout, with its console, if it does not)."""
        _run(self._podman, "start", self.name)
        deadline = time.monotonic() + timeout
        while self._inspect("{{.State.Status}}") not in ("exited", "stopped"):
            if time.monotonic() >= deadline:
                raise VmTimeout(
                    f"{self.image} still running {timeout:g}s after boot (no poweroff); "
                    f"its console:\n{self.console()[-6000:]}"
                )
            time.sleep(0.25)
        state = json.loads(_run(self._podman, "inspect", "--type", "container", self.name))[0][
            "State"
        ]
        return Boot(
            name=self.name,
            exit_code=int(state["ExitCode"]),
            started_at=parse_podman_time(state["StartedAt"]),
            finished_at=parse_podman_time(state["FinishedAt"]),
            journal=_read_journal(self._journal_dir),
            console=self.console(),
        )

    def read_file(self, path: str) -> bytes:
        """A file of the container's filesystem (running or not): ``podman cp`` out."""
        target = self._dir / "copied"
        shutil.rmtree(target, ignore_errors=True)
        _run(self._podman, "cp", f"{self.name}:{path}", str(target))
        return target.read_bytes()

    def console(self) -> str:
        """What systemd and journald wrote to the console (the container's tty)."""
        done = subprocess.run(
            [self._podman, "logs", self.name], capture_output=True, text=True, check=False
        )
        return done.stdout + done.stderr

    def _inspect(self, template: str) -> str:
        return _run(
            self._podman, "inspect", "--type", "container", "--format", template, self.name
        ).strip()

    def _write_files(self) -> None:
        """Into the created (not yet started) container, with ``podman cp``."""
        if self.unit_environment:
            dropin = self._dir / f"{UNIT}.d"
            dropin.mkdir()
            lines = "".join(
                f'Environment="{key}={value}"\n' for key, value in self.unit_environment.items()
            )
            (dropin / "test.conf").write_text(f"[Service]\n{lines}")
            # The image has no drop-in directory for the unit (no podman in it): cp makes it.
            _run(self._podman, "cp", str(dropin), f"{self.name}:/etc/systemd/system/{UNIT}.d")
        if self.user_data is not None:
            env_file = self._dir / "user-data.env"
            env_file.write_text("".join(f"{k}={v}\n" for k, v in self.user_data.items()))
            env_file.chmod(0o600)
            _run(self._podman, "cp", str(env_file), f"{self.name}:{USER_DATA_FILE}")


def _read_journal(directory: Path) -> list[dict]:
    """Every entry under a journal directory, oldest first (the host's journalctl reads
    the image's files: same systemd release)."""
    done = subprocess.run(
        ["journalctl", "--directory", str(directory), "--output", "json", "--no-pager"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 and not done.stdout:
        raise ImageBuildError(f"journalctl --directory {directory}: {done.stderr[-2000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _message(entry: dict) -> str:
    message = entry.get("MESSAGE", "")
    if isinstance(message, list):  # journalctl gives non-UTF-8 messages as byte arrays
        message = bytes(message).decode(errors="replace")
    return message


def _from_micros(value: str) -> datetime:
    return datetime.fromtimestamp(int(value) / 1e6, tz=timezone.utc)
