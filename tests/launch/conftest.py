"""The `vm` worker for real: a `prefect worker start --type vm` process, a vm work pool whose
"VMs" are the runner's VM image booted by podman (the local provider), the flow's code as a
bundle on moto S3, all against the session's Prefect server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.planted import record

STEP = "runner.steps.pull_bundle"
POOL_LABEL = "prefect-vm-runner-pool"


def vm_env(moto) -> dict[str, str]:
    """What every test VM needs in its user-data: the bundle's S3 (moto), no cloud
    metadata service to ask on loopback, quick heartbeats."""
    return {**moto.env(), "RUNNER_CLOUD": "none", "RUNNER_HEARTBEAT_SECONDS": "2"}


class Pool:
    """A vm work pool of the local provider, its worker process, and its deployments."""

    def __init__(
        self,
        server,
        client,
        bundle_url: str,
        tmp: Path,
        *,
        variables: dict[str, object],
        worker_env: dict[str, str] | None = None,
    ) -> None:
        """``variables``: the pool's defaults (machine_image, env, provider...);
        ``worker_env``: more environment for the worker process (a cloud's endpoint)."""
        self.server, self.client, self.bundle_url = server, client, bundle_url
        self.name = f"vms-{uuid.uuid4().hex[:8]}"
        self.log_path = tmp / f"{self.name}-worker.log"
        self.worker_env = worker_env or {}
        self._worker: subprocess.Popen[bytes] | None = None
        from prefect.client.schemas.actions import WorkPoolCreate

        from runner.launch.worker import VmWorker

        template = VmWorker.template_with(**variables)
        client.create_work_pool(
            WorkPoolCreate(name=self.name, type="vm", base_job_template=template)
        )

    def start_worker(self) -> None:
        log = self.log_path.open("ab")
        self._worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", self.name,
             "--type", "vm", "--name", f"{self.name}-worker"],
            env={**os.environ, **self.server.env(), "PREFECT_WORKER_QUERY_SECONDS": "1",
                 "PREFECT_WORKER_HEARTBEAT_SECONDS": "5", **self.worker_env},
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def kill_worker(self) -> None:
        """SIGKILL, as a machine that died would: no cleanup of its own."""
        if self._worker is not None:
            os.killpg(self._worker.pid, signal.SIGKILL)
            self._worker.wait()
            self._worker = None

    def stop_worker(self) -> None:
        if self._worker is not None:
            os.killpg(self._worker.pid, signal.SIGTERM)
            try:
                self._worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill_worker()
            self._worker = None

    def worker_log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        record(text)
        return text

    def wait_for_log(self, line: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"{line!r} not in the worker's log"
            time.sleep(0.25)

    def run(self, flow_name: str, *, job_variables: dict | None = None, **parameters: object):
        """A flow run of a new deployment in this pool, its code from the bundle."""
        flow_id = self.client.create_flow_from_name(flow_name.replace("_", "-"))
        deployment_id = self.client.create_deployment(
            flow_id=flow_id,
            name=f"vm-{uuid.uuid4().hex[:8]}",
            entrypoint=f"flows.py:{flow_name}",
            work_pool_name=self.name,
            pull_steps=[{STEP: {"url": self.bundle_url}}],
        )
        return self.client.create_flow_run_from_deployment(
            deployment_id, parameters=parameters, job_variables=job_variables
        )

    def wait_final(self, flow_run_id, timeout: float = 180):
        deadline = time.monotonic() + timeout
        while True:
            run = self.client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            assert time.monotonic() < deadline, (
                f"run {flow_run_id} is {run.state} after {timeout}s; worker log:\n"
                f"{self.worker_log()[-4000:]}"
            )
            time.sleep(0.5)

    def wait_state(self, flow_run_id, state_type: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while (run := self.client.read_flow_run(flow_run_id)).state.type.value != state_type:
            assert time.monotonic() < deadline, f"run is {run.state}, not {state_type}"
            time.sleep(0.25)
        return run

    def vms(self) -> list[str]:
        """The pool's VMs that exist, running or not (the provider's own listing)."""
        raise NotImplementedError

    def wait_no_vms(self, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while (left := self.vms()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def close(self) -> None:
        self.stop_worker()
        self.worker_log()


class LocalPool(Pool):
    """A pool of the local provider: its VMs are podman containers."""

    def vms(self) -> list[str]:
        return sorted(self.vm_states())

    def vm_states(self) -> dict[str, str]:
        """Each of the pool's containers and its podman state (running, exited...)."""
        done = subprocess.run(
            ["podman", "ps", "--all", "--filter", f"label={POOL_LABEL}={self.name}",
             "--format", "json"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return {c["Names"][0]: c["State"] for c in json.loads(done.stdout or "[]")}

    def close(self) -> None:
        super().close()
        for name in self.vms():
            subprocess.run(["podman", "rm", "--force", "--time", "0", name], check=False)


@pytest.fixture
def pool(prefect_server, moto, client, vm_image, bundle_url, tmp_path) -> Iterator[LocalPool]:
    env = vm_env(moto)
    pool = LocalPool(
        prefect_server, client, bundle_url, tmp_path,
        variables={"machine_image": vm_image, "env": env},
    )  # fmt: skip
    try:
        yield pool
    finally:
        pool.close()
