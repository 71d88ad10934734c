"""Startup benchmark: `prefect flow-run execute` vs `python -m runner`, same server, same flow.

Alternating runs; for each, the time from process start to the flow body's
first line and the total wall time. Prints one JSON line with the medians and
the runner/execute ratios (goal: first line <= 0.35, wall <= 0.45).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from devtools.prefect_server import PrefectServer

FLOWS = Path(__file__).resolve().parent / "flows"
GOALS = {"first_line_ratio": 0.35, "wall_ratio": 0.45}


def _commands(flow_run_id: str, workdir: Path) -> dict[str, list[str]]:
    prefect = str(Path(sys.executable).with_name("prefect"))
    return {
        "execute": [prefect, "flow-run", "execute", flow_run_id],
        "runner": [
            sys.executable,
            "-m",
            "runner",
            "--flow-run-id",
            flow_run_id,
            "--workdir",
            str(workdir),
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="runs of each command (default 5)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="runner-bench-"))
    samples: dict[str, dict[str, list[float]]] = {
        name: {"first_line_s": [], "wall_s": []} for name in ("execute", "runner")
    }
    with PrefectServer(scratch / "prefect") as server:
        env = {**os.environ, **server.env()}
        os.environ.update(server.env())
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with (
            temporary_settings(updates={PREFECT_API_URL: server.api_url}),
            get_client(sync_client=True) as client,
        ):
            flow_id = client.create_flow_from_name("first-line")
            deployment_id = client.create_deployment(
                flow_id=flow_id, name="bench", entrypoint="trivial.py:first_line", path=str(FLOWS)
            )
            for i in range(args.runs):
                # Alternate which goes first so that drift on the machine hits both alike.
                order = ("execute", "runner") if i % 2 == 0 else ("runner", "execute")
                for name in order:
                    stamp = scratch / f"{uuid.uuid4().hex}.stamp"
                    run = client.create_flow_run_from_deployment(
                        deployment_id, parameters={"stamp": str(stamp)}
                    )
                    command = _commands(str(run.id), scratch / "work")[name]
                    started = time.time()
                    done = subprocess.run(command, env=env, cwd=scratch, capture_output=True)
                    wall = time.time() - started
                    state = client.read_flow_run(run.id).state
                    if done.returncode != 0 or not state or not state.is_completed():
                        sys.stderr.write(done.stderr.decode()[-3000:])
                        raise SystemExit(
                            f"{name} run {run.id} did not complete ({done.returncode})"
                        )
                    samples[name]["first_line_s"].append(float(stamp.read_text()) - started)
                    samples[name]["wall_s"].append(wall)

    medians = {
        name: {key: round(statistics.median(values), 3) for key, values in metrics.items()}
        for name, metrics in samples.items()
    }
    ratios = {
        "first_line_ratio": round(
            medians["runner"]["first_line_s"] / medians["execute"]["first_line_s"], 3
        ),
        "wall_ratio": round(medians["runner"]["wall_s"] / medians["execute"]["wall_s"], 3),
    }
    met = all(ratios[key] <= goal for key, goal in GOALS.items())
    print(
        json.dumps(
            {
                "bench": "startup",
                "runs_each": args.runs,
                "medians": medians,
                **ratios,
                "goals": GOALS,
                "met": met,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
