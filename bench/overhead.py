"""Telemetry overhead: a CPU-bound flow run by the runner with metrics and heartbeats every
second vs with telemetry off, alternating, on one local Prefect server.

Prints one JSON line: the wall-time overhead (goal under 2%), and the guard's own
CPU while the flow runs (after a 15 s warm-up; goal under 1% of one core; the figure
with start-up included is printed too) and unique memory (USS, goal under 30 MB),
read with psutil while the runs with telemetry go on.
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
from pathlib import Path

import psutil

from devtools.prefect_server import PrefectServer

FLOWS = Path(__file__).resolve().parent / "flows"
GOALS = {"wall_overhead_max": 0.02, "guard_cpu_percent_max": 1.0, "guard_uss_mb_max": 30.0}
# The guard's one-off start-up (its imports, then Prefect's for sending events) is
# reported apart: the goal is about what it costs while the flow runs.
_WARM_UP = 15.0
MODES = {
    "off": ["--metrics-seconds", "0", "--heartbeat-seconds", "0"],
    "on": ["--metrics-seconds", "1", "--heartbeat-seconds", "1"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs of each mode (default 3)")
    parser.add_argument("--seconds", type=float, default=60, help="the flow's length (60)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="runner-bench-overhead-"))
    samples: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    with PrefectServer(scratch / "prefect") as server:
        env = {**os.environ, **server.env()}
        deployment_id = _deployment(server)
        for i in range(args.runs):
            for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
                samples[mode].append(_run(server, env, deployment_id, mode, args.seconds, scratch))
    wall = {mode: statistics.median(s["wall_s"] for s in runs) for mode, runs in samples.items()}
    on = samples["on"]
    result = {
        "bench": "overhead",
        "runs_each": args.runs,
        "flow_seconds": args.seconds,
        "wall_s": {mode: round(value, 3) for mode, value in wall.items()},
        "wall_overhead": round(wall["on"] / wall["off"] - 1, 4),
        "guard_cpu_percent": round(statistics.median(s["guard_cpu_percent"] for s in on), 3),
        "guard_cpu_percent_with_startup": round(
            statistics.median(s["guard_cpu_percent_with_startup"] for s in on), 3
        ),
        "guard_uss_mb": round(max(s["guard_uss_mb"] for s in on), 1),
        "goals": GOALS,
    }
    result["met"] = (
        result["wall_overhead"] < GOALS["wall_overhead_max"]
        and result["guard_cpu_percent"] < GOALS["guard_cpu_percent_max"]
        and result["guard_uss_mb"] < GOALS["guard_uss_mb_max"]
    )
    print(json.dumps(result))
    return 0


def _deployment(server: PrefectServer) -> object:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        flow_id = client.create_flow_from_name("spin")
        return client.create_deployment(
            flow_id=flow_id, name="bench", entrypoint="cpu.py:spin", path=str(FLOWS)
        )


def _run(server, env, deployment_id, mode: str, seconds: float, scratch: Path) -> dict[str, float]:
    """One run; the guard's CPU and USS are sampled while it lives (the guard is the
    process started; its CPU time is read just before it exits)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        run = client.create_flow_run_from_deployment(deployment_id, parameters={"seconds": seconds})
    command = [sys.executable, "-m", "runner", "--flow-run-id", str(run.id)]
    command += ["--workdir", str(scratch / "work"), *MODES[mode]]
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    guard = psutil.Process(proc.pid)
    cpu = uss = 0.0
    steady_from: tuple[float, float] | None = None  # (time, cpu) once start-up is over
    while proc.poll() is None:
        try:
            times = guard.cpu_times()
            cpu = times.user + times.system  # its own, not its children's
            uss = max(uss, guard.memory_full_info().uss)
        except psutil.Error:
            break
        now = time.monotonic()
        if steady_from is None and now - started >= _WARM_UP:
            steady_from = (now, cpu)
        time.sleep(0.2)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.read().decode()[-3000:])
        raise SystemExit(f"run {run.id} ({mode}) failed with {proc.returncode}")
    steady = (
        100 * (cpu - steady_from[1]) / (started + wall - steady_from[0]) if steady_from else 0.0
    )
    return {
        "wall_s": wall,
        "guard_cpu_percent": steady,
        "guard_cpu_percent_with_startup": 100 * cpu / wall,
        "guard_uss_mb": uss / 2**20,
    }


if __name__ == "__main__":
    raise SystemExit(main())
