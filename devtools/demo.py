"""`make demo`: run the Coiled-guide example flow through the runner, all on this machine.

Starts a throwaway Prefect server (SQLite, loopback, temp home) and a local
S3-compatible server (moto), pushes the example flow's code bundle to it with
`python -m runner bundle push`, registers a deployment whose pull step names
the bundle, creates a flow run, runs `python -m runner --flow-run-id ID` (which
pulls the bundle from S3), prints the outcome, and stops both servers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devtools.prefect_server import PrefectServer
from devtools.storage_servers import MotoServer

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "coiled_guide"


def main() -> int:
    scratch = Path(tempfile.mkdtemp(prefix="runner-demo-"))
    print(f"==> starting a local Prefect server (home {scratch / 'prefect'})", flush=True)
    started = time.monotonic()
    with PrefectServer(scratch / "prefect") as server, MotoServer() as s3:
        print(f"    up in {time.monotonic() - started:.1f}s at {server.api_url}", flush=True)
        print(f"==> local S3 server (moto) at {s3.env()['AWS_ENDPOINT_URL']}", flush=True)
        s3.create_bucket("flows")
        os.environ.update(server.env())
        os.environ.update(s3.env())
        # Persist the flow's result so that this script can read it back and print it.
        os.environ["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

        with (
            temporary_settings(
                updates={
                    PREFECT_API_URL: server.api_url,
                    PREFECT_LOCAL_STORAGE_PATH: server.env()["PREFECT_LOCAL_STORAGE_PATH"],
                }
            ),
            get_client(sync_client=True) as client,
        ):
            push = [
                sys.executable,
                "-m",
                "runner",
                "bundle",
                "push",
                str(EXAMPLE),
                "--to",
                "s3://flows/coiled-guide",
            ]
            print(f"==> {' '.join(['python', *push[1:]])}", flush=True)
            bundle_url = subprocess.run(
                push, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True
            ).stdout.strip()
            print(f"    {bundle_url}", flush=True)

            flow_id = client.create_flow_from_name("my-flow")
            deployment_id = client.create_deployment(
                flow_id=flow_id,
                name="coiled-guide",
                entrypoint="flow.py:my_flow",
                pull_steps=[{"runner.steps.pull_bundle": {"url": bundle_url}}],
            )
            flow_run = client.create_flow_run_from_deployment(deployment_id)
            print(
                f"==> registered deployment coiled-guide (its pull step names the bundle); "
                f"flow run {flow_run.id}",
                flush=True,
            )

            workdir = scratch / "work"
            command = [
                sys.executable,
                "-m",
                "runner",
                "--flow-run-id",
                str(flow_run.id),
                "--workdir",
                str(workdir),
                "--keep-workdir",  # so that the run's files can be looked at afterwards
            ]
            print(f"==> {' '.join(['python', *command[1:]])}", flush=True)
            started = time.monotonic()
            code = subprocess.call(command, cwd=REPO)
            wall = time.monotonic() - started

            final = client.read_flow_run(flow_run.id)
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
            print("\n==> outcome")
            print(f"    runner exit code : {code}  ({wall:.1f}s wall)")
            print(f"    final state      : {final.state.name if final.state else 'none'}")
            if final.state and final.state.is_completed():
                print(f"    result           : {final.state.result()}")
            print(f"    logs in Prefect  : {len(logs)} lines stored for the run")
            print(f"    code and files   : {workdir / 'runs' / str(flow_run.id)}")
            print(
                "    against your own server: PREFECT_API_URL=... python -m runner --flow-run-id ID"
            )
    print("==> local Prefect and S3 servers stopped")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
