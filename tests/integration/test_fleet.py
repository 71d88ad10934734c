"""A fleet of 20 runners, each a simulated VM, against one Prefect server on PostgreSQL:
every run Completed exactly once, no heartbeat gap, no log line lost (bench/fleet.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections import Counter

import pytest

from bench.fleet import Fleet, fleet_server, read_events, run_fleet
from devtools.prefect_server import PrefectServer
from tests.conftest import FLOWS_DIR


@pytest.mark.timeout(600)
def test_twenty_runners_booting_at_four_a_second_all_complete_once(tmp_path):
    fleet = Fleet("runner", runners=20, rate=4.0, seconds=8, heartbeat_seconds=2, metrics_seconds=2)
    with fleet_server(tmp_path) as server:
        result = run_fleet(server, fleet)

    assert result["checks"]["problems"] == []
    assert result["held"] and result["checks"]["completed_once"] == 20
    assert result["exit_codes"] == {"0": 20}
    per_runner = result["per_runner"]
    # What each VM asked of the server, by the runner's own REST client and by the flow's:
    # its claim, its heartbeats and metrics (events, batched), the flow's states and logs.
    endpoints = per_runner["by_endpoint"]
    assert endpoints["runner POST /flow_runs/{id}/set_state"]["requests"] >= 1
    assert endpoints["runner POST /events"]["requests"] >= 1
    assert endpoints["prefect POST /flow_runs/{id}/set_state"]["requests"] >= 2
    assert endpoints["prefect POST /logs/"]["requests"] >= 1
    assert per_runner["server_ms"]["p95"] is not None
    assert per_runner["websockets"]["/events/out"] >= 1  # the cancel watch's
    shutil.rmtree(result["scratch"], ignore_errors=True)


def test_a_vm_batches_heartbeat_and_metrics_and_polls_rarely_while_its_websocket_listens(
    tmp_path,
):
    """Fewer requests per VM, counted by the server: a heartbeat and a metrics sample that
    fall due together go in one POST /events, and the cancel poll slows down while the
    websocket is subscribed (each of these doubled the count before)."""
    record = tmp_path / "requests.jsonl"
    with PrefectServer(tmp_path / "server", record=record) as server:
        env = {**os.environ, **server.env()}
        run = _run_on(server, "sleeper", pid_file=str(tmp_path / "pid"), seconds=8)
        done = subprocess.run(
            [
                sys.executable, "-m", "runner", "--flow-run-id", str(run),
                "--workdir", str(tmp_path / "work"),
                "--heartbeat-seconds", "1", "--metrics-seconds", "1",
                "--cancel-poll-seconds", "0.5",
            ],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        stored = Counter(
            event["event"]
            for event in read_events(
                server.api_url,
                names=[
                    "prefect.flow-run.heartbeat",
                    "runner.metrics",
                    "prefect.flow-run.Completed",
                ],
                resource_id=f"prefect.flow-run.{run}",
            )
        )
    # Read once the server is down: a websocket's line is written when it closes.
    calls = [json.loads(line) for line in record.read_text().splitlines()]

    runner = [c for c in calls if c["kind"] == "runner"]
    events = [c for c in runner if c["route"] == "/events"]
    polls = [c for c in runner if c["method"] == "GET" and c["route"] == "/flow_runs/{id}"]
    websockets = [c for c in calls if c["method"] == "WS" and c["route"] == "/events/out"]
    # A heartbeat and a sample a second from the claim on: each pair in one POST, and the
    # run's phase events (6 at most, some of them batched too) besides.
    heartbeats, samples = stored["prefect.flow-run.heartbeat"], stored["runner.metrics"]
    assert heartbeats >= 8 and samples >= 8, stored
    assert len(events) <= max(heartbeats, samples) + 6, (len(events), stored)
    # A poll every 0.5 s would be 16 or more; one in 6 while the websocket listens: ~3.
    assert websockets and len(polls) <= 8, len(polls)


def _run_on(server: PrefectServer, flow_name: str, **parameters: object) -> uuid.UUID:
    """A Scheduled run of a tests/flows deployment on this test's own server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        flow_id = client.create_flow_from_name(flow_name)
        deployment_id = client.create_deployment(
            flow_id=flow_id, name="fleet-test", entrypoint=f"flows.py:{flow_name}",
            path=str(FLOWS_DIR),
        )  # fmt: skip
        return client.create_flow_run_from_deployment(deployment_id, parameters=parameters).id
