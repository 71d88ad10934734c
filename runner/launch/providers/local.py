"""The ``local`` provider: a "VM" is a podman container of the runner's VM image, booted with
systemd as PID 1 (``make image-test`` builds that image), on this machine's network."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from runner.errors import BootstrapError, ConfigError, output_tail
from runner.launch.providers.base import TAG_POOL, Vm, VmRequest
from runner.launch.user_data import USER_DATA_FILE, as_env_file

# podman's flags for a container booted as a VM: runc and ulimits these machines accept,
# the host's network (the "VM" reaches a local Prefect server), systemd as init, and a
# console (the tty) for `podman logs` to give as the boot output.
_BOOT_FLAGS = (
    "--runtime=runc",
    "--ulimit=nofile=1024:1024",
    "--ulimit=nproc=1024:1024",
    "--network=host",
    "--systemd=always",
    "--tty",
)
_PODMAN_TIMEOUT = 120
_STATES = {"created": "starting", "configured": "starting", "running": "running"}


class LocalProvider:
    """VMs as podman containers; ``region``, spot and types mean nothing here, and cpu and
    memory become the container's limits."""

    def __init__(self, *, podman: str | None = None) -> None:
        found = podman or shutil.which("podman")
        if found is None:
            raise ConfigError("the local provider needs podman: apt-get install podman runc")
        self._podman_path = found

    def create(self, request: VmRequest) -> Vm:
        if request.gpu or request.arm:
            raise ConfigError("the local provider cannot choose a GPU or an ARM machine")
        if not request.machine_image:
            raise ConfigError(
                "the local provider needs machine_image: the VM image's podman tag "
                "(make image-test builds localhost/prefect-vm-runner-vm:...)"
            )
        limits = []
        if request.cpu:
            limits.append(f"--cpus={request.cpu:g}")
        if request.memory_gib:
            limits.append(f"--memory={int(request.memory_gib * 1024)}m")
        labels = [f"--label={key}={value}" for key, value in request.tags.items()]
        self._podman_run(
            "create", "--quiet", "--pull=never", f"--name={request.name}", *_BOOT_FLAGS,
            *limits, *labels,
            request.machine_image, "/sbin/init",
            doing=f"creating VM {request.name} from {request.machine_image}",
        )  # fmt: skip
        try:
            self._write_user_data(request)
            self._podman_run("start", request.name, doing=f"starting VM {request.name}")
        except BaseException:
            self.delete(request.name)
            raise
        return self.describe(request.name)

    def describe(self, vm_id: str) -> Vm:
        done = self._podman_out("inspect", "--type", "container", vm_id)
        if done is None:
            return Vm(vm_id, "gone")
        info = json.loads(done)[0]
        status = info["State"]["Status"]
        return Vm(
            vm_id,
            _STATES.get(status, "stopped"),  # type: ignore[arg-type]
            tags=info["Config"].get("Labels") or {},
            created=parse_podman_time(info["Created"]),
        )

    def delete(self, vm_id: str) -> None:
        # Its disk is the container's layer: removing the container removes it.
        self._podman_out("rm", "--force", "--time", "0", vm_id)

    def console(self, vm_id: str) -> str:
        done = self._podman(["logs", vm_id])
        return done.stdout + done.stderr

    def list(self, pool: str) -> list[Vm]:
        out = self._podman_out(
            "ps", "--all", "--filter", f"label={TAG_POOL}={pool}", "--format", "{{.Names}}"
        )
        vms = (self.describe(name) for name in (out or "").split())
        return [vm for vm in vms if vm.state != "gone"]

    def _write_user_data(self, request: VmRequest) -> None:
        """As cloud-init would have, before the unit starts: ``podman cp`` into the
        created container, mode 0600 (it holds the API key)."""
        with tempfile.TemporaryDirectory(prefix="vm-user-data-") as tmp:
            path = Path(tmp) / "user-data.env"
            path.touch(mode=0o600)
            path.write_text(as_env_file(request.user_data), encoding="utf-8")
            self._podman_run(
                "cp", str(path), f"{request.name}:{USER_DATA_FILE}",
                doing=f"writing the user-data of VM {request.name}",
            )  # fmt: skip

    def _podman_run(self, *args: str, doing: str) -> None:
        done = self._podman(args)
        if done.returncode != 0:
            tail = output_tail(done.stdout + done.stderr, 3)
            if "image not known" in tail or "no such image" in tail.lower():
                raise ConfigError(f"{doing}: the image does not exist here ({tail})")
            raise BootstrapError(f"{doing}: podman failed: {tail}")

    def _podman_out(self, *args: str) -> str | None:
        """The command's output; None when the container does not exist; BootstrapError
        for any other failure (podman's storage locked, say: not a sign the VM is gone)."""
        done = self._podman(args)
        if done.returncode == 0:
            return done.stdout
        message = done.stdout + done.stderr
        if "no such container" in message.lower() or "no such object" in message.lower():
            return None
        raise BootstrapError(f"podman {args[0]} failed: {output_tail(message, 3)}")

    def _podman(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [self._podman_path, *args],
                capture_output=True,
                text=True,
                check=False,
                timeout=_PODMAN_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise BootstrapError(f"podman {args[0]} did not answer in {_PODMAN_TIMEOUT}s") from None


def parse_podman_time(value: str) -> datetime:
    """podman's RFC 3339 times with nanoseconds (and an offset or Z), to an aware datetime."""
    value = value.strip().replace("Z", "+00:00")
    head, _, rest = value.partition(".")
    if rest:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        value = f"{head}.{rest[:digits][:6].ljust(6, '0')}{rest[digits:]}"
    return datetime.fromisoformat(value)


def from_config(**_: object) -> LocalProvider:
    return LocalProvider()
