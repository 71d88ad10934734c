"""The Prefect API goes away mid-run and comes back: the flow goes on, and what the runner
had to send (heartbeats, metrics, the flow's logs, the final state) reaches the API."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from devtools.fault_proxy import FaultProxy, Request
from devtools.prefect_server import PrefectServer
from tests.conftest import FLOWS_DIR, Runner
from tests.helpers import read_events

LINES = 20  # one a second: the run outlasts the outage by several seconds
OUTAGE_SECONDS = 8


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrefectServer]:
    """This test's own server: stopping the session's would disturb every other test."""
    with PrefectServer(tmp_path / "server") as server:
        yield server


def _deployed_run(server: PrefectServer, flow_name: str, **parameters: object) -> uuid.UUID:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        flow_id = client.create_flow_from_name(flow_name.replace("_", "-"))
        deployment_id = client.create_deployment(
            flow_id=flow_id,
            name=f"outage-{uuid.uuid4().hex[:8]}",
            entrypoint=f"flows.py:{flow_name}",
            path=str(FLOWS_DIR),
        )
        return client.create_flow_run_from_deployment(deployment_id, parameters=parameters).id


def _log_messages(api_url: str, run_id: uuid.UUID) -> list[str]:
    body = {"logs": {"flow_run_id": {"any_": [str(run_id)]}}, "limit": 200}
    response = httpx.post(f"{api_url}/logs/filter", json=body, timeout=10)
    response.raise_for_status()
    return [entry["message"] for entry in response.json()]


def _wait_for_log(
    api_url: str, run_id: uuid.UUID, line: str, proc: subprocess.Popen[str], timeout: float = 60
) -> bool:
    """True once ``line`` is in the run's logs; False if the runner ended first."""
    deadline = time.monotonic() + timeout
    while line not in _log_messages(api_url, run_id):
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"{line!r} not logged within {timeout}s"
        time.sleep(0.25)
    return True


def _occurred(event: dict) -> datetime:
    return datetime.fromisoformat(event["occurred"].replace("Z", "+00:00"))


def test_server_stopped_and_restarted_mid_run(server: PrefectServer, tmp_path: Path):
    run_id = _deployed_run(server, "numbered_logs", count=LINES, pause=1.0)
    runner = Runner(server, tmp_path)

    proc = runner.start(
        "--flow-run-id", str(run_id), "--heartbeat-seconds", "1", "--metrics-seconds", "1"
    )
    try:
        started = _wait_for_log(server.api_url, run_id, "line 2", proc)
        if started:
            down_at = datetime.now(timezone.utc)
            with server.down():
                time.sleep(OUTAGE_SECONDS)
            up_at = datetime.now(timezone.utc)
            outlasted = proc.poll() is None
    finally:
        result = runner.finish(proc, timeout=120)

    assert started, f"the runner ended before the outage:\n{result.stderr}"
    assert outlasted, "the run must outlast the outage"

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.teardowns == ["0"]
    state = httpx.get(f"{server.api_url}/flow_runs/{run_id}", timeout=10).json()["state"]
    assert state["type"] == "COMPLETED", state
    messages = _log_messages(server.api_url, run_id)
    missing = [k for k in range(1, LINES + 1) if f"line {k}" not in messages]
    assert not missing, f"lines lost: {missing}"
    resource = f"prefect.flow-run.{run_id}"
    beats = read_events(
        server.api_url,
        event="prefect.flow-run.heartbeat",
        resource_id=resource,
        at_least=LINES,
    )
    before = [b for b in beats if _occurred(b) < down_at]
    during = [b for b in beats if down_at <= _occurred(b) < up_at]
    after = [b for b in beats if _occurred(b) >= up_at]
    assert before and after, (len(before), len(during), len(after))
    # What the guard could not send during the outage was kept, and sent once it ended.
    assert len(during) >= OUTAGE_SECONDS - 1, (len(before), len(during), len(after))
    metrics = read_events(
        server.api_url, event="runner.metrics", resource_id=resource, at_least=LINES
    )
    assert [m for m in metrics if down_at <= _occurred(m) < up_at]


def test_api_down_at_start_and_up_within_api_wait_completes(server: PrefectServer, tmp_path):
    run_id = _deployed_run(server, "hello", n=2)
    runner = Runner(server, tmp_path)

    with server.down():
        proc = runner.start("--flow-run-id", str(run_id), "--api-wait", "120")
        time.sleep(3)
        waited = proc.poll() is None
    result = runner.finish(proc, timeout=180)

    assert waited, f"the runner gave up while the API was down:\n{result.stderr}"
    assert result.returncode == 0, result.stderr
    assert result.teardowns == ["0"]
    state = httpx.get(f"{server.api_url}/flow_runs/{run_id}", timeout=10).json()["state"]
    assert state["type"] == "COMPLETED", state
    assert runner.written_outside_workdir() == []


def test_api_down_for_longer_than_api_wait_is_exit_3_and_leaves_the_run_unclaimed(
    server: PrefectServer, tmp_path
):
    run_id = _deployed_run(server, "hello", n=2)
    runner = Runner(server, tmp_path)

    with server.down():
        result = runner.run("--flow-run-id", str(run_id), "--api-wait", "2", timeout=60)

    result.assert_one_error(3, "unreachable for 2s")
    assert runner.written_outside_workdir() == []
    # Back up: the run was never claimed, so another VM can still take it.
    state = httpx.get(f"{server.api_url}/flow_runs/{run_id}", timeout=10).json()["state"]
    assert state["type"] == "SCHEDULED", state


def test_a_500_to_prefects_client_as_it_loads_the_flow_is_asked_again(
    server: PrefectServer, tmp_path
):
    """A loaded server's transient 500 to Prefect's own client, as it reads the deployment to
    load the flow's code, costs the run nothing: the client asks again (a fleet of 50
    runners lost a run to exactly this)."""
    run_id = _deployed_run(server, "hello", n=2)
    runner = Runner(server, tmp_path)

    def prefects_deployment_read(request: Request) -> bool:
        return (
            request.method == "GET"
            and "/deployments/" in request.path
            and request.headers.get("user-agent", "").startswith("prefect/")
        )

    with FaultProxy(server.url) as proxy:
        proxy.answer(
            prefects_deployment_read, 500, b'{"exception_message": "Internal Server Error"}',
            content_type="application/json", times=2,
        )  # fmt: skip
        result = runner.run("--flow-run-id", str(run_id), PREFECT_API_URL=f"{proxy.url}/api")
        reads = [r for r in proxy.requests if prefects_deployment_read(r)]

    assert result.returncode == 0, result.stderr
    assert len(reads) == 3  # two answered 500, the third went through
    state = httpx.get(f"{server.api_url}/flow_runs/{run_id}", timeout=10).json()["state"]
    assert state["type"] == "COMPLETED", state
