"""The guard's heartbeats reach the server while the flow runs."""

from __future__ import annotations

from datetime import datetime

from tests.helpers import read_events

STEP = "runner.steps.pull_bundle"


def test_guard_sends_heartbeats_while_the_flow_runs(runner, flow_run, prefect_server, tmp_path):
    run = flow_run("sleeper", pid_file=str(tmp_path / "pid"), seconds=4)

    result = runner.run("--flow-run-id", str(run.id), "--heartbeat-seconds", "1")

    assert result.returncode == 0, result.stderr
    events = read_events(
        prefect_server.api_url,
        event="prefect.flow-run.heartbeat",
        resource_id=f"prefect.flow-run.{run.id}",
        at_least=4,
    )
    assert len(events) >= 4
    related_roles = {r["prefect.resource.role"] for r in events[0]["related"]}
    assert {"flow", "deployment"} <= related_roles
    assert all(0.5 < gap < 2.0 for gap in _gaps(events)), _gaps(events)


def test_heartbeats_can_be_turned_off(runner, flow_run, prefect_server):
    run = flow_run("hello")

    result = runner.run("--flow-run-id", str(run.id), "--heartbeat-seconds", "0")

    assert result.returncode == 0, result.stderr
    # Check the run's other events did arrive, so that "no heartbeat" is not a late batch.
    assert read_events(
        prefect_server.api_url,
        event="prefect.flow-run.Completed",
        resource_id=f"prefect.flow-run.{run.id}",
    )
    assert (
        read_events(
            prefect_server.api_url,
            event="prefect.flow-run.heartbeat",
            resource_id=f"prefect.flow-run.{run.id}",
            timeout=0,
        )
        == []
    )


def _gaps(events: list[dict]) -> list[float]:
    times = sorted(datetime.fromisoformat(e["occurred"].replace("Z", "+00:00")) for e in events)
    return [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]


def test_heartbeats_keep_their_rate_while_the_flow_holds_the_gil(runner, flow_run, prefect_server):
    run = flow_run("spin", seconds=5)

    result = runner.run("--flow-run-id", str(run.id), "--heartbeat-seconds", "1")

    assert result.returncode == 0, result.stderr
    events = read_events(
        prefect_server.api_url,
        event="prefect.flow-run.heartbeat",
        resource_id=f"prefect.flow-run.{run.id}",
        at_least=5,
    )
    assert len(events) >= 5
    assert all(0.8 <= gap <= 1.2 for gap in _gaps(events)), _gaps(events)


def test_heartbeats_flow_during_a_slow_code_pull(runner, flow_run, prefect_server, tmp_path):

    from devtools.storage_servers import HttpFileServer
    from tests.conftest import FLOWS_DIR

    root = tmp_path / "served"
    pushed = runner.cli("bundle", "push", str(FLOWS_DIR), "--to", str(root))
    assert pushed.returncode == 0, pushed.stderr
    name = pushed.stdout.strip().rsplit("/", 1)[1]
    with HttpFileServer(root) as http:
        http.delay = 4.0
        run = flow_run("hello", path=None, pull_steps=[{STEP: {"url": f"{http.url}/{name}"}}])
        result = runner.run("--flow-run-id", str(run.id), "--heartbeat-seconds", "1")

    assert result.returncode == 0, result.stderr
    resource = f"prefect.flow-run.{run.id}"
    pulled = read_events(
        prefect_server.api_url, event="runner.phase.code-pulled", resource_id=resource
    )
    assert pulled and pulled[0]["payload"]["seconds"] >= 4
    beats = read_events(
        prefect_server.api_url, event="prefect.flow-run.heartbeat", resource_id=resource, at_least=3
    )
    during_pull = [b for b in beats if b["occurred"] < pulled[0]["occurred"]]
    assert len(during_pull) >= 3
    assert all(0.8 <= gap <= 1.2 for gap in _gaps(during_pull)), _gaps(during_pull)
