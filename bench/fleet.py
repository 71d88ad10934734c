"""Fleet: N runners against one Prefect server on PostgreSQL, each a simulated VM (its own
process, workdir, cache and Prefect home), started at an arrival rate as VMs boot; then
the same N runs with ``prefect flow-run execute`` (its own heartbeats on) as the baseline.

    python -m bench.fleet --runners 20,50,100 --rate 2 --seconds 60

Each size is run until one fails (a run not ``Completed`` exactly once, a heartbeat gap
past 1.5 periods, a log line missing): the largest that held is this box's limit. The
server writes a line per request it serves (devtools/metered_server.py), from which one
JSON line per fleet gives, per runner: requests and bytes by endpoint, requests per
minute at steady state (every VM running), the server's p50/p95 time for the fleet's
calls, and the CPU of the server and of PostgreSQL per runner (% of one core).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import psutil

from devtools.postgres_server import PostgresServer
from devtools.prefect_server import PrefectServer

FLOWS = Path(__file__).resolve().parent / "flows"
MODES = ("runner", "execute")
# The bench's own calls (its health probe, its checks) are told apart by their agent.
BENCH_AGENT = {"User-Agent": "bench"}


@dataclass
class Fleet:
    """One fleet's settings: ``runners`` VMs of ``mode``, ``rate`` starting per second, each
    running a flow of ``seconds``; the runner's telemetry periods (its defaults unless set)."""

    mode: str
    runners: int
    rate: float = 2.0
    seconds: int = 60
    heartbeat_seconds: float = 30.0
    metrics_seconds: float = 15.0
    runner_args: list[str] = field(default_factory=list)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runners", default="20,50", help="fleet sizes, in order (20,50)")
    parser.add_argument("--rate", type=float, default=2.0, help="VMs starting per second (2)")
    parser.add_argument("--seconds", type=int, default=60, help="each flow's length (60)")
    parser.add_argument("--modes", default="runner,execute", help="runner,execute")
    parser.add_argument("--heartbeat-seconds", type=float, default=30.0)
    parser.add_argument("--metrics-seconds", type=float, default=15.0)
    args = parser.parse_args()

    sizes = [int(n) for n in args.runners.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    results: dict[tuple[str, int], dict] = {}
    with fleet_server(Path(tempfile.mkdtemp(prefix="runner-bench-fleet-"))) as server:
        for mode in modes:
            for size in sizes:
                fleet = Fleet(
                    mode, size, args.rate, args.seconds,
                    args.heartbeat_seconds, args.metrics_seconds,
                )  # fmt: skip
                result = results[mode, size] = run_fleet(server, fleet)
                print(json.dumps(result), flush=True)
                if not result["held"]:
                    break  # the next size would only fail harder
    print(json.dumps(_compare(results)), flush=True)
    return 0


def _compare(results: dict[tuple[str, int], dict]) -> dict:
    """The largest fleet each mode held, and per size run by both: the runner's server
    requests and server CPU per run over ``flow-run execute``'s."""
    held = {
        mode: max((n for (m, n), r in results.items() if m == mode and r["held"]), default=0)
        for mode in {m for m, _ in results}
    }
    ratios = {}
    for (mode, size), runner in results.items():
        execute = results.get(("execute", size))
        if mode != "runner" or execute is None:
            continue
        ratios[str(size)] = {
            "requests": round(
                runner["per_runner"]["requests"] / execute["per_runner"]["requests"], 2
            ),
            "server_cpu": round(
                runner["server_cpu_percent_per_runner"]["server"]
                / execute["server_cpu_percent_per_runner"]["server"],
                2,
            ),
        }
    return {"bench": "fleet", "largest_held": held, "runner_over_execute": ratios}


class fleet_server:  # noqa: N801  (a context manager, named for the `with`)
    """PostgreSQL, and a metered Prefect server on it: ``with fleet_server(dir) as server``."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch

    def __enter__(self) -> PrefectServer:
        self.db = PostgresServer().__enter__()
        try:
            self.server = PrefectServer(
                self.scratch / "prefect",
                database_url=self.db.database_url,
                record=self.scratch / "requests.jsonl",
            ).__enter__()
        except BaseException:
            self.db.__exit__(None, None, None)
            raise
        self.server.database = self.db  # type: ignore[attr-defined]
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(None, None, None)
        self.db.__exit__(None, None, None)


def run_fleet(server: PrefectServer, fleet: Fleet) -> dict:
    """Start the fleet at its rate, wait for every VM to end, check every run, and report."""
    scratch = server.home.parent / f"{fleet.mode}-{fleet.runners}-{uuid.uuid4().hex[:6]}"
    run_ids = _create_runs(server, fleet)
    db_pid = server.database.pid  # type: ignore[attr-defined]
    cpu_before = {"server": tree_cpu(server.pid), "postgres": tree_cpu(db_pid)}
    health = _HealthProbe(server.api_url)
    health.start()
    started = time.time()
    procs = []
    for i, run_id in enumerate(run_ids):
        time.sleep(max(0.0, started + i / fleet.rate - time.time()))
        procs.append(_start_vm(server, fleet, run_id, scratch / f"vm-{i}"))
    last_started = time.time()
    exits, first_exit = _wait_all(procs, timeout=fleet.seconds + len(procs) / fleet.rate + 600)
    ended = time.time()
    health.stop()
    cpu = {
        name: tree_cpu(pid) - cpu_before[name]
        for name, pid in (("server", server.pid), ("postgres", db_pid))
    }
    checks = _check_runs(server, fleet, run_ids)
    requests = [
        r for r in _read_records(server.record) if started <= r["t"] <= ended
    ]  # fmt: skip
    run_minutes = sum(fleet.seconds for _ in run_ids) / 60
    return {
        "bench": "fleet",
        "mode": fleet.mode,
        "runners": fleet.runners,
        "rate_per_s": fleet.rate,
        "flow_seconds": fleet.seconds,
        "heartbeat_seconds": fleet.heartbeat_seconds if fleet.mode == "runner" else 30,
        "held": checks["held"],
        "wall_s": round(ended - started, 1),
        "exit_codes": dict(Counter(str(code) for code in exits)),
        "checks": checks,
        "health_max_s": round(health.worst, 2),
        "per_runner": _per_runner(requests, fleet.runners, (last_started + 10, first_exit - 5)),
        "server_cpu_percent_per_runner": {
            name: round(100 * seconds / 60 / run_minutes, 3) for name, seconds in cpu.items()
        },
        "scratch": str(scratch),
    }


def _create_runs(server: PrefectServer, fleet: Fleet) -> list[uuid.UUID]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        flow_id = client.create_flow_from_name("vm-job")
        deployment_id = client.create_deployment(
            flow_id=flow_id,
            name=f"fleet-{fleet.mode}-{uuid.uuid4().hex[:6]}",
            entrypoint="fleet.py:vm_job",
            path=str(FLOWS),
        )
        return [
            client.create_flow_run_from_deployment(
                deployment_id, parameters={"seconds": fleet.seconds}
            ).id
            for _ in range(fleet.runners)
        ]


def _start_vm(server: PrefectServer, fleet: Fleet, run_id: uuid.UUID, vm: Path) -> subprocess.Popen:
    """One simulated VM: its own directory for everything a machine would keep apart."""
    vm.mkdir(parents=True)
    env = {**os.environ, **server.env(), "PREFECT_HOME": str(vm / "prefect-home")}
    if fleet.mode == "runner":
        command = [
            sys.executable, "-m", "runner", "--flow-run-id", str(run_id),
            "--workdir", str(vm / "work"),
            "--heartbeat-seconds", str(fleet.heartbeat_seconds),
            "--metrics-seconds", str(fleet.metrics_seconds),
            *fleet.runner_args,
        ]  # fmt: skip
    else:
        # Prefect's own heartbeats at the runner's default period (its least is 30 s).
        env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = env["PREFECT_RUNNER_HEARTBEAT_FREQUENCY"] = "30"
        command = [sys.executable, "-m", "prefect", "flow-run", "execute", str(run_id)]
    with open(vm / "output.log", "wb") as output:
        return subprocess.Popen(
            command, env=env, cwd=vm, stdout=output, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> tuple[list[int | None], float]:
    """Exit codes (None: killed at the deadline), and when the first VM ended."""
    deadline = time.monotonic() + timeout
    first_exit: float | None = None
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if first_exit is None and any(p.poll() is not None for p in procs):
            first_exit = time.time()
        time.sleep(0.5)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            proc.returncode = None  # type: ignore[assignment]
    return [p.returncode for p in procs], first_exit or time.time()


def _check_runs(server: PrefectServer, fleet: Fleet, run_ids: list[uuid.UUID]) -> dict:
    """Every run ``Completed`` exactly once (one Running, one Completed), its heartbeats
    with no gap past 1.5 periods, and every log line of its flow stored."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    period = fleet.heartbeat_seconds if fleet.mode == "runner" else 30.0
    problems: list[str] = []
    with (
        temporary_settings(updates={PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        for run_id in run_ids:
            states = Counter(s.type.value for s in client.read_flow_run_states(run_id))
            final = client.read_flow_run(run_id).state
            if final is None or final.type.value != "COMPLETED" or states["RUNNING"] != 1:
                name = final.name if final else None
                problems.append(f"{run_id}: {name}, Running {states['RUNNING']} times")
                continue
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            ticks = {log.message for log in logs if log.message.startswith("tick ")}
            if len(ticks) != fleet.seconds:
                problems.append(f"{run_id}: {len(ticks)} of {fleet.seconds} log lines")
            if period and (gap := _worst_heartbeat_gap(server.api_url, run_id)) > 1.5 * period:
                problems.append(f"{run_id}: heartbeat gap {gap:.0f}s")
    completed_once = len(run_ids) - len(problems)
    return {"held": not problems, "completed_once": completed_once, "problems": problems[:10]}


def _worst_heartbeat_gap(api_url: str, run_id: uuid.UUID) -> float:
    """The longest time between two heartbeats of the run, from its first Running to its
    Completed (both included as ends), read from the stored events."""
    events = read_events(
        api_url,
        names=[f"prefect.flow-run.{name}" for name in ("heartbeat", "Running", "Completed")],
        resource_id=f"prefect.flow-run.{run_id}",
    )
    beats = sorted(_when(e) for e in events if e["event"].endswith("heartbeat"))
    ends = [_when(e) for e in events if not e["event"].endswith("heartbeat")]
    if not ends or not beats:
        return float("inf")
    times = sorted([min(ends), *beats, max(ends)])
    return max((b - a).total_seconds() for a, b in zip(times, times[1:], strict=False))


def read_events(api_url: str, *, names: list[str], resource_id: str) -> list[dict]:
    """Stored events of one resource, every page; asked again for a while until its
    ``Completed`` is there (the server's event persister writes in batches)."""
    now = datetime.now(timezone.utc)
    body = {
        "filter": {
            "event": {"name": names},
            "any_resource": {"id": [resource_id]},
            "occurred": {
                "since": (now - timedelta(hours=2)).isoformat(),
                "until": (now + timedelta(minutes=5)).isoformat(),
            },
        },
        "limit": 50,  # the most the API gives a page
    }
    events: list[dict] = []
    with httpx.Client(timeout=30, headers=BENCH_AGENT) as http:
        for _ in range(20):
            page = http.post(f"{api_url}/events/filter", json=body)
            page.raise_for_status()
            events = page.json()["events"]
            while next_page := page.json().get("next_page"):
                page = http.get(next_page)
                page.raise_for_status()
                events += page.json()["events"]
            if any(e["event"].endswith("Completed") for e in events):
                break
            time.sleep(1)
    return events


def _when(event: dict) -> datetime:
    return datetime.fromisoformat(event["occurred"].replace("Z", "+00:00"))


def _per_runner(requests: list[dict], runners: int, steady: tuple[float, float]) -> dict:
    """What one VM cost the server: requests and bytes by endpoint over its whole run,
    requests per minute while every VM ran, and the server's time for them."""
    fleet = [r for r in requests if r["kind"] != "bench"]
    calls = [r for r in fleet if r["method"] != "WS"]
    by_endpoint: dict[str, dict[str, float]] = defaultdict(lambda: {"n": 0, "bytes": 0})
    for r in calls:
        entry = by_endpoint[f"{r['kind']} {r['method']} {r['route']}"]
        entry["n"] += 1
        entry["bytes"] += r["in"] + r["out"]
    start, end = steady
    in_window = [r for r in calls if start <= r["t"] <= end]
    minutes = (end - start) / 60
    latencies = [r["ms"] for r in calls]
    errors = Counter(str(r["status"]) for r in calls if r["status"] >= 500)
    return {
        "requests": round(len(calls) / runners, 1),
        "bytes": round(sum(r["in"] + r["out"] for r in calls) / runners),
        "websockets": {
            route: round(n / runners, 2)
            for route, n in Counter(r["route"] for r in fleet if r["method"] == "WS").items()
        },
        "requests_per_minute_steady": (
            round(len(in_window) / runners / minutes, 2) if minutes >= 0.25 else None
        ),
        "steady_window_s": round(max(0.0, end - start), 1),
        "server_ms": _percentiles(latencies),
        "server_errors": dict(errors),
        "by_endpoint": {
            name: {"requests": round(v["n"] / runners, 2), "bytes": round(v["bytes"] / runners)}
            for name, v in sorted(by_endpoint.items(), key=lambda kv: -kv[1]["n"])
        },
    }


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if len(values) < 2:
        return {"p50": values[0] if values else None, "p95": values[0] if values else None}
    cuts = statistics.quantiles(values, n=20)
    return {"p50": round(statistics.median(values), 1), "p95": round(cuts[18], 1)}


def _read_records(path: Path | None) -> Iterable[dict]:
    assert path is not None
    with open(path) as lines:
        for line in lines:
            if line.endswith("\n"):
                yield json.loads(line)


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of a process, its live children and the children it has reaped
    (PostgreSQL's backends come and go)."""
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        times = root.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in root.children(recursive=True):
            try:
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0.0


class _HealthProbe(threading.Thread):
    """Asks ``/health`` every 2 s; ``worst`` is its longest answer (a timeout counts 30 s)."""

    def __init__(self, api_url: str) -> None:
        super().__init__(daemon=True)
        self._url = f"{api_url}/health"
        self._stopping = threading.Event()
        self.worst = 0.0

    def run(self) -> None:
        while not self._stopping.wait(2):
            started = time.monotonic()
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(self._url, timeout=30, headers=BENCH_AGENT)
            self.worst = max(self.worst, time.monotonic() - started)

    def stop(self) -> None:
        self._stopping.set()
        self.join()


if __name__ == "__main__":
    # A SIGTERM unwinds like Ctrl-C, so that the servers it started are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    raise SystemExit(main())
