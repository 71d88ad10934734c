"""The guard's heartbeats reach the server while the flow runs."""

from __future__ import annotations

from datetime import datetime

from tests.helpers import read_events


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
    times = sorted(datetime.fromisoformat(e["occurred"].replace("Z", "+00:00")) for e in events)
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
    assert all(0.5 < gap < 2.0 for gap in gaps), gaps


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
