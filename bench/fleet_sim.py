"""Fleet simulation: past what one box can run as processes, replay one runner's requests
(bench/fleet.py measured them) for 1,000 or 10,000 simulated VMs from one asyncio
process, at their arrival rate, against a Prefect server on PostgreSQL; report where its
latency or its errors start.

    python -m bench.fleet_sim --vms 1000 --rate 10 --life 120

Each simulated VM, on a real flow run of its own: reads its run, claims it (Pending),
reads the deployment, opens the cancel watch's websocket (subscribed as the runner
subscribes), proposes Running; then, until its life is over, sends a heartbeat event
every ``--heartbeat-seconds``, a metrics event every ``--metrics-seconds`` (batched in one
POST /events when both fall due), its flow's log lines every 2 s (as Prefect's log
handler batches them), and polls its state every ``--cancel-poll-seconds``; then proposes
Completed, writes its summary artifact and its last events, and closes its websocket.

Bounded: VMs stop arriving at ``--vms``, after ``--max-seconds``, or at the first 10 s
window whose p95 passes ``--slow-seconds`` or whose errors pass 1%; then the live ones
end their runs. A JSON line per window (live VMs, requests per second, p50/p95, errors),
and a last line with where latency and errors started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

from bench.fleet import fleet_server, tree_cpu

WINDOW = 10.0  # seconds per reported window
LOG_FLUSH = 2.0  # Prefect's APILogHandler sends its batch every 2 s
AGENT = {"User-Agent": "prefect-vm-runner/sim"}


@dataclass
class Settings:
    vms: int = 1000
    rate: float = 10.0
    life: float = 120.0
    heartbeat_seconds: float = 30.0
    metrics_seconds: float = 15.0
    cancel_poll_seconds: float = 10.0
    log_lines_per_second: float = 1.0
    websocket: bool = True
    max_seconds: float = 600.0
    slow_seconds: float = 2.0


@dataclass
class Stats:
    """Every request's (end time, seconds, ok), and the live VMs; read per window."""

    calls: list[tuple[float, float, bool]] = field(default_factory=list)
    live: int = 0
    started: int = 0
    failed_vms: int = 0
    websockets: int = 0
    peak_live: int = 0
    slow_from_live: int | None = None  # live VMs in the first window past --slow-seconds
    errors_from_live: int | None = None  # ... in the first with over 1% errors
    ending: asyncio.Event = field(default_factory=asyncio.Event)  # live VMs end their runs now


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    defaults = Settings()
    for name, value in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    settings = Settings(**vars(parser.parse_args()))
    _raise_file_limit()  # a websocket and a connection or two per VM, on both sides
    with fleet_server(Path(tempfile.mkdtemp(prefix="runner-bench-fleet-sim-"))) as server:
        pids = {"server": server.pid, "postgres": server.database.pid}  # type: ignore[attr-defined]
        summary = asyncio.run(simulate(server.api_url, settings, pids))
    print(json.dumps(summary), flush=True)
    return 0


async def simulate(api_url: str, settings: Settings, pids: dict[str, int | None]) -> dict:
    """Ramp VMs up at ``settings.rate`` until done or past the server's limit; ``pids``:
    the processes whose CPU each window reports (the server, PostgreSQL)."""
    stats = Stats()
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(
        base_url=api_url + "/", timeout=60, limits=limits, headers=AGENT
    ) as http:
        deployment_id = await _deployment(http)
        reporter = asyncio.create_task(_report(stats, settings, pids))
        began = time.monotonic()
        vms: list[asyncio.Task] = []
        stop_reason = f"all {settings.vms} VMs started"
        for i in range(settings.vms):
            await asyncio.sleep(max(0.0, began + i / settings.rate - time.monotonic()))
            if reporter.done():
                stop_reason = reporter.result()
                stats.ending.set()  # what is measured is measured: no need to wait out lives
                break
            if time.monotonic() - began > settings.max_seconds:
                stop_reason = f"--max-seconds {settings.max_seconds:g} reached"
                stats.ending.set()
                break
            vms.append(asyncio.create_task(_vm(http, api_url, deployment_id, settings, stats)))
        await asyncio.gather(*vms, return_exceptions=True)
        reporter.cancel()
    return {
        "bench": "fleet_sim",
        "settings": vars(settings),
        "vms_started": stats.started,
        "vms_failed": stats.failed_vms,
        "stopped_because": stop_reason,
        "peak_live": stats.peak_live,
        "slow_from_live": stats.slow_from_live,
        "errors_from_live": stats.errors_from_live,
        "cpu_s": {"load_generator": round(time.process_time(), 1)},
    }


async def _report(stats: Stats, settings: Settings, pids: dict[str, int | None]) -> str:
    """A JSON line per window; returns (ending the ramp) once the server is past its limit."""
    seen = 0

    def cpu_now() -> dict[str, float]:
        # The load generator shares the box: past ~90% of its core, it is the limit.
        return {"load_generator": time.process_time()} | {
            name: tree_cpu(pid) for name, pid in pids.items()
        }

    cpu = cpu_now()
    while True:
        await asyncio.sleep(WINDOW)
        cpu_was, cpu = cpu, cpu_now()
        window, seen = stats.calls[seen:], len(stats.calls)
        times = [seconds for _, seconds, _ in window]
        errors = sum(1 for *_, ok in window if not ok)
        p95 = statistics.quantiles(times, n=20)[18] if len(times) >= 2 else None
        line = {
            "live_vms": stats.live,
            "started": stats.started,
            "requests_per_s": round(len(window) / WINDOW, 1),
            "p50_s": round(statistics.median(times), 3) if times else None,
            "p95_s": round(p95, 3) if p95 is not None else None,
            "errors": errors,
            "websockets": stats.websockets,
            "cpu_percent": {n: round(100 * (cpu[n] - cpu_was[n]) / WINDOW) for n in cpu},
        }
        print(json.dumps(line), flush=True)
        stats.peak_live = max(stats.peak_live, stats.live)
        if p95 is not None and p95 > settings.slow_seconds and stats.slow_from_live is None:
            stats.slow_from_live = stats.live
        if window and errors / len(window) > 0.01 and stats.errors_from_live is None:
            stats.errors_from_live = stats.live
        if stats.slow_from_live is not None or stats.errors_from_live is not None:
            return f"server past its limit at {stats.live} live VMs"


async def _deployment(http: httpx.AsyncClient) -> str:
    flow = await http.post("flows/", json={"name": "vm-job-sim"})
    flow.raise_for_status()
    deployment = await http.post(
        "deployments/",
        json={"name": "sim", "flow_id": flow.json()["id"], "entrypoint": "fleet.py:vm_job"},
    )
    deployment.raise_for_status()
    return deployment.json()["id"]


async def _vm(
    http: httpx.AsyncClient, api_url: str, deployment_id: str, settings: Settings, stats: Stats
) -> None:
    """One simulated VM's life, on a run the launcher created for it."""
    created = await http.post(f"deployments/{deployment_id}/create_flow_run", json={})
    if created.status_code >= 300:
        stats.failed_vms += 1
        return
    run_id = created.json()["id"]
    stats.started += 1
    stats.live += 1
    api = _Timed(http, stats)
    ws: asyncio.Task | None = None
    try:
        await api.call("GET", f"flow_runs/{run_id}")
        await api.call("POST", f"flow_runs/{run_id}/set_state", json=_state("PENDING"))
        await api.call("GET", f"deployments/{deployment_id}")
        await api.call(
            "POST", "events", json=_phases(run_id, "claimed", "env-ready", "code-pulled")
        )
        if settings.websocket:
            ws = asyncio.create_task(_cancel_watch(api_url, run_id, stats))
        await api.call("GET", f"flow_runs/{run_id}")
        await api.call("POST", f"flow_runs/{run_id}/set_state", json=_state("RUNNING"))
        await _run(api, run_id, settings, stats.ending)
        await api.call("POST", f"flow_runs/{run_id}/set_state", json=_state("COMPLETED"))
        await api.call("POST", "artifacts/", json=_artifact(run_id))
        await api.call("POST", "events", json=_phases(run_id, "flow-finished", "teardown"))
    except httpx.HTTPError:
        stats.failed_vms += 1
    finally:
        if ws is not None:
            ws.cancel()
        stats.live -= 1


async def _run(api: _Timed, run_id: str, settings: Settings, ending: asyncio.Event) -> None:
    """The flow's life: each periodic request when it falls due, in time order, until its
    life is over or the simulation ends."""
    # The runner polls one time in 6 while its websocket is subscribed (cancellation.py).
    poll_slowdown = 6 if settings.websocket else 1
    periods = {
        "heartbeat": settings.heartbeat_seconds,
        "metrics": settings.metrics_seconds,
        "poll": settings.cancel_poll_seconds * poll_slowdown,
        "logs": LOG_FLUSH if settings.log_lines_per_second > 0 else 0,
    }
    began = time.monotonic()
    # VMs drift apart; a VM's heartbeat and metrics periods both start at its claim.
    due = {name: random.uniform(0, p) for name, p in periods.items() if p > 0}
    if "heartbeat" in due and "metrics" in due:
        due["heartbeat"] = due["metrics"] = settings.metrics_seconds
    while due:
        name, at = min(due.items(), key=lambda item: item[1])
        if at >= settings.life:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ending.wait(), max(0.0, began + at - time.monotonic()))
        if ending.is_set():
            return
        now = time.monotonic() - began
        if name in ("heartbeat", "metrics"):
            # The guard's outbox sends what is queued in one POST: both when both are due.
            kinds = [k for k in ("heartbeat", "metrics") if k in due and due[k] <= now + 0.05]
            await api.call("POST", "events", json=[_event(run_id, _EVENT[k]) for k in kinds])
            for kind in kinds:
                due[kind] += periods[kind]
            continue
        if name == "poll":
            await api.call("GET", f"flow_runs/{run_id}")
        else:
            lines = round(LOG_FLUSH * settings.log_lines_per_second)
            await api.call("POST", "logs/", json=[_log(run_id, n) for n in range(lines)])
        due[name] += periods[name]


_EVENT = {"heartbeat": "prefect.flow-run.heartbeat", "metrics": "runner.metrics"}


class _Timed:
    """Calls that count into ``stats``: a 5xx or no answer is an error, not an exception."""

    def __init__(self, http: httpx.AsyncClient, stats: Stats) -> None:
        self._http = http
        self._stats = stats

    async def call(self, method: str, path: str, **kwargs: object) -> None:
        started = time.monotonic()
        try:
            response = await self._http.request(method, path, **kwargs)  # type: ignore[arg-type]
            ok = response.status_code < 500
        except httpx.HTTPError:
            ok = False
        self._stats.calls.append((time.monotonic(), time.monotonic() - started, ok))


async def _cancel_watch(api_url: str, run_id: str, stats: Stats) -> None:
    """The runner's cancel watch: a websocket subscribed to the run's Cancelling event."""
    from websockets.asyncio.client import connect

    url = "ws" + api_url.removeprefix("http") + "/events/out"
    now = datetime.now(timezone.utc)
    subscription = {
        "type": "filter",
        "backfill": True,
        "filter": {
            "event": {"name": ["prefect.flow-run.Cancelling"]},
            "any_resource": {"id": [f"prefect.flow-run.{run_id}"]},
            "occurred": {
                "since": (now - timedelta(minutes=10)).isoformat(),
                "until": (now + timedelta(days=366)).isoformat(),
            },
        },
    }
    try:
        async with connect(url, subprotocols=["prefect"], open_timeout=30) as socket:  # type: ignore[list-item]
            await socket.send(json.dumps({"type": "auth", "token": None}))
            await socket.recv()
            await socket.send(json.dumps(subscription))
            stats.websockets += 1
            try:
                async for _ in socket:
                    pass
            finally:
                stats.websockets -= 1
    except Exception:  # noqa: BLE001  (refused or dropped: the runner would poll)
        return


def _state(kind: str) -> dict:
    name = kind.capitalize()
    return {"state": {"type": kind, "name": name, "message": "simulated runner"}, "force": False}


def _event(run_id: str, name: str) -> dict:
    """An event the size of the runner's (its resource, related flow and deployment, and a
    metrics payload like runner.metrics's)."""
    payload = {"cpu_percent": 12.5, "memory": {"used": 1 << 30, "total": 8 << 30}}
    if name == "runner.metrics":
        payload |= {"disk": {"read": 1234, "write": 5678}, "net": {"sent": 42, "recv": 4242}}
        payload |= {"processes": [{"pid": 100 + i, "rss": 1 << 25} for i in range(8)]}
    return {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(timezone.utc).isoformat(),
        "event": name,
        "resource": {
            "prefect.resource.id": f"prefect.flow-run.{run_id}",
            "prefect.resource.name": "simulated-vm",
            "runner.instance-type": "m6i.large",
            "runner.region": "eu-west-1",
        },
        "related": [
            {"prefect.resource.id": f"prefect.{role}.{uuid.uuid4()}", "prefect.resource.role": role}
            for role in ("flow", "deployment")
        ],
        "payload": payload,
    }


def _phases(run_id: str, *phases: str) -> list[dict]:
    return [_event(run_id, f"runner.phase.{phase}") for phase in phases]


def _log(run_id: str, n: int) -> dict:
    return {
        "name": "prefect.flow_runs",
        "level": 20,
        "message": f"tick {n}: a line of the flow's own output, of a usual length",
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "flow_run_id": run_id,
    }


def _artifact(run_id: str) -> dict:
    return {
        "key": "runner-summary",
        "type": "markdown",
        "data": "| what | value |\n|---|---|\n" + "| a row | of the summary |\n" * 20,
        "flow_run_id": run_id,
    }


def _raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    # A SIGTERM unwinds like Ctrl-C, so that the servers it started are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    raise SystemExit(main())
