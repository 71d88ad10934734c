"""`make demo-vm`: the whole launch loop on this machine, each step with its time.

A local Prefect server and S3 (moto); the runner's VM image built (images/provision/*.sh in
a Debian rootfs with systemd, booted by podman: the `local` provider); a `vm` work pool
whose VMs are that image; `prefect deploy` of the Coiled-guide example (its code pushed to
S3 as a bundle) and `prefect deployment run`; a real `prefect worker start --type vm`,
which starts a "VM" for the run. The runner in it claims, pulls and runs the flow and
powers the VM off; the worker removes it. Everything is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devtools.prefect_server import PrefectServer
from devtools.storage_servers import MotoServer
from devtools.vm_image import CACHE_DIR, build_vm_image

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "coiled_guide"
POOL = "demo-vms"
DEPLOYMENT = "my-flow/on-a-vm"
T0 = time.monotonic()


def step(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {text}", flush=True)


def main() -> int:
    scratch = Path(tempfile.mkdtemp(prefix="runner-demo-vm-"))
    step("starting a local Prefect server and S3 (moto)")
    with PrefectServer(scratch / "prefect") as server, MotoServer() as s3:
        step(f"Prefect API at {server.api_url}; S3 at {s3.env()['AWS_ENDPOINT_URL']}")
        s3.create_bucket("flows")
        env = {
            **os.environ, **server.env(), **s3.env(),
            "BUNDLE_BUCKET_URL": "s3://flows/coiled-guide", "VM_POOL": POOL,
        }  # fmt: skip
        os.environ.update(server.env())
        step("building the runner's VM image (cached after the first time: minutes cold)")
        image = build_vm_image(REPO, cache_dir=CACHE_DIR)
        step(f"VM image {image}")
        _create_pool(image, vm_env=s3.env())
        step(f"created work pool {POOL} (type vm, provider local)")
        _prefect(env, "--no-prompt", "deploy", "--all", cwd=EXAMPLE)
        step("prefect deploy: bundle pushed to S3, deployment on-a-vm created")
        worker = _start_worker(env, scratch / "worker.log")
        try:
            step(f"worker started: prefect worker start --pool {POOL} --type vm")
            _prefect(env, "deployment", "run", DEPLOYMENT, cwd=EXAMPLE)
            code = _follow(scratch / "worker.log")
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
            step("worker stopped")
    shutil.rmtree(scratch, ignore_errors=True)
    step("Prefect server and S3 stopped")
    return code


def _create_pool(image: str, *, vm_env: dict[str, str]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from runner.launch.worker import VmWorker

    # The VM reaches the bundle on moto; there is no cloud metadata service to ask here.
    template = VmWorker.template_with(machine_image=image, env={**vm_env, "RUNNER_CLOUD": "none"})
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="vm", base_job_template=template))


def _prefect(env: dict[str, str], *args: str, cwd: Path) -> None:
    print(f"         $ prefect {' '.join(args)}", flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "prefect", *args], env=env, cwd=cwd, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"prefect {' '.join(args)} failed:\n{done.stdout}{done.stderr}")


def _start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "vm"],
        env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
        cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _follow(worker_log: Path, timeout: float = 300) -> int:
    """Print the run's way through: VM started, Running, final state, VM removed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs()[0]
        step(f"flow run {run.name} ({run.id}) created by prefect deployment run")
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = client.read_flow_run(run.id)
            state = run.state.name if run.state else "none"
            if run.infrastructure_pid and "vm" not in seen:
                seen.add("vm")
                step(f"the worker started VM {run.infrastructure_pid} (podman, systemd as PID 1)")
            if state not in seen:
                seen.add(state)
                step(f"flow run is {state}")
            if run.state and run.state.is_final():
                break
            time.sleep(0.2)
        while "deleted" not in worker_log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        else:
            step(f"VM {run.infrastructure_pid} powered off and was deleted by the worker")
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        lines = [log.message for log in logs if "Squares" in log.message]
        print(f"         the flow said: {lines[0] if lines else '(no line)'}", flush=True)
        left = subprocess.run(
            ["podman", "ps", "--all", "--filter", f"label=prefect-vm-runner-pool={POOL}",
             "--format", "{{.Names}}"], capture_output=True, text=True, check=False,
        ).stdout.split()  # fmt: skip
        step(f"final state {run.state.name if run.state else 'none'}; VMs left: {left or 'none'}")
        return 0 if run.state and run.state.is_completed() and not left else 1


if __name__ == "__main__":
    raise SystemExit(main())
