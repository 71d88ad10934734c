"""VMs played by the tests, for clouds that start none here (moto's EC2, the GCE and ARM
stand-ins): each new VM of the pool is "booted" (its runner run with the user-data the
cloud holds, as the image's unit would), and when the runner ends the VM powers off, as
the image's poweroff does on that cloud. One subclass per cloud says how."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from tests.planted import record


class VmSimulator:
    """``with SomeCloudVms(...) as vms:`` boots the pool's VMs while the block runs;
    ``vms.user_data[vm_id]`` is what the cloud held for it, ``vms.teardowns(vm_id)`` the
    exit code of each teardown its runner carried out."""

    def __init__(self, moto, workdir: Path, *, unset: tuple[str, ...] = ()) -> None:
        """``unset``: variables of this process the VMs do not have."""
        self.moto, self.workdir, self.unset = moto, workdir, unset
        self.user_data: dict[str, str] = {}
        self.errors: list[BaseException] = []
        self._runners: dict[str, subprocess.Popen[bytes]] = {}
        self._powered_off: set[str] = set()
        workdir.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    # What each cloud says: which VMs run, what they were given, how one powers off.
    def running(self) -> list[str]:
        raise NotImplementedError

    def read_user_data(self, vm_id: str) -> tuple[str, str]:
        """(what the cloud holds, the user-data file it makes on the VM)."""
        raise NotImplementedError

    def power_off(self, vm_id: str) -> None:
        raise NotImplementedError

    def __enter__(self) -> VmSimulator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for runner in self._runners.values():
            try:
                runner.wait(timeout=30)  # its teardown
            except subprocess.TimeoutExpired:
                runner.kill()
                runner.wait()
        for log in self.workdir.glob("*.log"):
            record(log.read_text(errors="replace"))
        assert not self.errors, self.errors

    def teardowns(self, vm_id: str) -> list[str]:
        marker = self.workdir / f"{vm_id}.teardown"
        return marker.read_text().split() if marker.exists() else []

    def _run(self) -> None:
        try:
            while not self._stop.wait(0.3):
                self._tick()
        except BaseException as exc:  # surfaced by __exit__
            self.errors.append(exc)

    def _tick(self) -> None:
        for vm_id in self.running():
            if vm_id not in self._runners:
                self._boot(vm_id)
        for vm_id, runner in self._runners.items():
            if runner.poll() is not None and vm_id not in self._powered_off:
                self.power_off(vm_id)  # the unit's poweroff, whatever the runner did
                self._powered_off.add(vm_id)

    def _boot(self, vm_id: str) -> None:
        self.user_data[vm_id], env_text = self.read_user_data(vm_id)
        env_file = self.workdir / f"{vm_id}.env"
        env_file.write_text(env_text)
        log = (self.workdir / f"{vm_id}.log").open("wb")
        self._runners[vm_id] = subprocess.Popen(
            [sys.executable, "-m", "runner", "--user-data-file", str(env_file),
             "--workdir", str(self.workdir / vm_id), "--on-exit", "command",
             "--on-exit-command", f'echo "$RUNNER_EXIT_CODE" >> {self.workdir / vm_id}.teardown'],
            env={**{k: v for k, v in os.environ.items() if k not in self.unset},
                 **self.moto.env()},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
