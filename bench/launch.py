"""Launch benchmark: a `vm` pool of the local provider against a `process` pool running
`prefect flow-run execute`, on the same box and the same Prefect server.

Both pools get the same deployment (the flow's code as a bundle on a local S3, moto) and a
real `prefect worker start` polling every second; runs alternate between the pools (vm,
process, process, vm, ...). Two measures, in seconds:

- ``run_to_first_line``: from the flow run's creation (``prefect deployment run``) to the
  timestamp of the flow's first log line: polling, submission, the VM's boot (systemd as
  PID 1, the runner's unit) or the process's start, the claim, the code pull;
- ``flow_end_to_removed``: from the Completed state's timestamp to the moment the VM is
  removed (the runner powers it off; the worker deletes it) or the process has exited.

Prints one JSON line with the medians and the vm/process ratios. The vm pool does more
(a whole machine boots and is deleted), so these are costs to know, not goals.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import psutil

from devtools.prefect_server import PrefectServer
from devtools.storage_servers import MotoServer
from devtools.vm_image import CACHE_DIR, build_vm_image

REPO = Path(__file__).resolve().parent.parent
FLOWS = Path(__file__).resolve().parent / "flows"
POOLS = ("vm", "process")
MEASURES = ("run_to_first_line", "flow_end_to_removed")
FIRST_LINE = "first line of the flow"
_TIMEOUT = 180.0


def _when(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class Bench:
    def __init__(self, server: PrefectServer, s3: MotoServer, scratch: Path, image: str) -> None:
        os.environ.update(server.env())  # before Prefect is imported: it reads them then
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate

        from runner.launch.worker import VmWorker

        self.http = httpx.Client(base_url=server.api_url, timeout=10)
        self.env = {**os.environ, **s3.env(), "PREFECT_WORKER_QUERY_SECONDS": "1"}
        s3.create_bucket("bench")
        bundle = subprocess.run(
            [sys.executable, "-m", "runner", "bundle", "push", str(FLOWS), "--to", "s3://bench/f"],
            env=self.env, capture_output=True, text=True, check=True, cwd=REPO,
        ).stdout.strip()  # fmt: skip
        template = VmWorker.template_with(
            machine_image=image, env={**s3.env(), "RUNNER_CLOUD": "none"}
        )
        self.workers: list[subprocess.Popen[bytes]] = []
        self.deployments = {}
        with get_client(sync_client=True) as client:
            for pool in POOLS:
                name = f"bench-{pool}"
                create = WorkPoolCreate(name=name, type=pool)
                if pool == "vm":
                    create = WorkPoolCreate(name=name, type="vm", base_job_template=template)
                client.create_work_pool(create)
                flow_id = client.create_flow_from_name("launched")
                self.deployments[pool] = client.create_deployment(
                    flow_id=flow_id,
                    name=f"bench-{pool}-{uuid.uuid4().hex[:6]}",
                    entrypoint="launch.py:launched",
                    work_pool_name=name,
                    pull_steps=[{"runner.steps.pull_bundle": {"url": bundle}}],
                )
                log = (scratch / f"worker-{pool}.log").open("wb")
                self.workers.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "prefect",
                            "worker",
                            "start",
                            "--pool",
                            name,
                            "--type",
                            pool,
                        ],
                        env=self.env,
                        cwd=REPO,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )  # fmt: skip
                )

    def close(self) -> None:
        for worker in self.workers:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=30)
        self.http.close()

    def sample(self, pool: str) -> dict[str, float]:
        response = self.http.post(f"/deployments/{self.deployments[pool]}/create_flow_run", json={})
        response.raise_for_status()
        run = response.json()
        created = _when(run["created"])
        deadline = time.monotonic() + _TIMEOUT
        while True:
            state = self.http.get(f"/flow_runs/{run['id']}").json()
            if state["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{pool} run {run['id']} is {state['state']['type']}")
            time.sleep(0.05)
        if state["state"]["type"] != "COMPLETED":
            raise RuntimeError(f"{pool} run ended {state['state']['type']}")
        ended = _when(state["state"]["timestamp"])
        infrastructure = state["infrastructure_pid"]
        removed = self._removed(pool, infrastructure, deadline)
        logs = self.http.post(
            "/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200}
        ).json()
        first = min(_when(entry["timestamp"]) for entry in logs if FIRST_LINE in entry["message"])
        return {"run_to_first_line": first - created, "flow_end_to_removed": removed - ended}

    @staticmethod
    def _removed(pool: str, infrastructure: str, deadline: float) -> float:
        """When the VM is gone (podman no longer has it) or the process has exited."""
        while time.monotonic() < deadline:
            if pool == "vm":
                gone = (
                    subprocess.run(
                        ["podman", "container", "exists", infrastructure], check=False
                    ).returncode
                    != 0
                )
            else:
                gone = not psutil.pid_exists(int(infrastructure.rpartition(":")[2]))
            if gone:
                return time.time()
            time.sleep(0.02)
        raise RuntimeError(f"{pool} {infrastructure} still there")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs in each pool (default 3)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="runner-bench-launch-"))
    image = build_vm_image(REPO, cache_dir=CACHE_DIR)
    samples: dict[str, list[dict[str, float]]] = {pool: [] for pool in POOLS}
    with PrefectServer(scratch / "prefect") as server, MotoServer() as s3:
        bench = Bench(server, s3, scratch, image)
        try:
            for i in range(args.runs):
                for pool in POOLS if i % 2 == 0 else POOLS[::-1]:
                    sample = bench.sample(pool)
                    samples[pool].append(sample)
                    figures = ", ".join(f"{k} {v:.2f}s" for k, v in sample.items())
                    sys.stderr.write(f"[{i}] {pool}: {figures}\n")
        finally:
            bench.close()
    medians = {
        m: {p: round(statistics.median(s[m] for s in samples[p]), 3) for p in POOLS}
        for m in MEASURES
    }
    ratios = {m: round(medians[m]["vm"] / medians[m]["process"], 2) for m in MEASURES}
    print(json.dumps({"bench": "launch", "runs_each": args.runs, "median_s": medians,
                      "ratio_vm_to_process": ratios}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
