"""Startup benchmark: `prefect flow-run execute` vs `python -m runner`, same server, same flow.

Alternating runs; for each, the time from process start to the flow body's
first line and the total wall time. Prints one JSON line with the medians and
the runner/execute ratios (goal: first line <= 0.35, wall <= 0.45), for two
conditions of the same venv:

- ``compiled``: bytecode compiled ahead of time, as `make install` and the
  images do (``uv pip install --compile-bytecode``);
- ``source``: no usable bytecode, every import compiled from source (an empty
  ``PYTHONPYCACHEPREFIX`` with ``PYTHONDONTWRITEBYTECODE``), as in a venv
  installed without ``--compile-bytecode`` on a machine that cannot cache it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path

from devtools.prefect_server import PrefectServer

FLOWS = Path(__file__).resolve().parent / "flows"
RUNNER_PACKAGE = Path(__file__).resolve().parent.parent / "runner"
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
    parser.add_argument("--bytecode", choices=("both", "compiled", "source"), default="both")
    args = parser.parse_args()
    conditions = ("compiled", "source") if args.bytecode == "both" else (args.bytecode,)

    scratch = Path(tempfile.mkdtemp(prefix="runner-bench-"))
    if "compiled" in conditions:
        site = Path(sysconfig.get_paths()["purelib"])
        # Some packages ship modules for newer Pythons that cannot compile here: not an error.
        compile_all = [
            sys.executable,
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            str(site),
            str(RUNNER_PACKAGE),
        ]
        subprocess.run(compile_all, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report: dict[str, object] = {"bench": "startup", "runs_each": args.runs}
    with PrefectServer(scratch / "prefect") as server:
        os.environ.update(server.env())
        for condition in conditions:
            env = {**os.environ, **server.env()}
            if condition == "source":
                env.update(
                    PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=tempfile.mkdtemp(dir=scratch)
                )
            report[condition] = _measure(server, env, scratch, args.runs)
    report["met"] = all(report[c]["met"] for c in conditions)  # type: ignore[index]
    print(json.dumps(report))
    return 0


def _measure(server: PrefectServer, env: dict[str, str], scratch: Path, runs: int) -> dict:
    """Alternate the two commands ``runs`` times each; medians and ratios."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    samples: dict[str, dict[str, list[float]]] = {
        name: {"first_line_s": [], "wall_s": []} for name in ("execute", "runner")
    }
    with (
        temporary_settings(updates={PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        flow_id = client.create_flow_from_name("first-line")
        deployment_id = client.create_deployment(
            flow_id=flow_id, name="bench", entrypoint="trivial.py:first_line", path=str(FLOWS)
        )
        for i in range(runs):
            # Alternate which goes first so that drift on the machine hits both alike.
            for name in ("execute", "runner") if i % 2 == 0 else ("runner", "execute"):
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
                    raise SystemExit(f"{name} run {run.id} did not complete ({done.returncode})")
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
    return {"medians": medians, **ratios, "goals": GOALS, "met": met}


if __name__ == "__main__":
    raise SystemExit(main())
