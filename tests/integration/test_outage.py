"""The Prefect API goes away mid-run and comes back: the flow goes on, and what the runner
had to send (heartbeats, metrics, the flow's logs, the final state) reaches the API. And a
loaded API that answers 500 to some of the runner's requests costs the run nothing, while
one that keeps answering 500 past --api-wait ends it Crashed, naming the endpoint."""

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


INTERNAL_ERROR = b'{"exception_message": "Internal Server Error"}'


def _set_state(request: Request, state_type: str) -> bool:
    return (
        request.method == "POST"
        and request.path.endswith("/set_state")
        and f'"type":"{state_type}"'.encode() in request.body.replace(b" ", b"")
    )


def _from_the_runner(request: Request) -> bool:
    """The runner's own calls, not Prefect's client's (``prefect/3.x``) in the flow stage."""
    return request.headers.get("user-agent", "").startswith(("prefect-vm-runner/", "python-httpx/"))


@pytest.mark.parametrize("fault", ["refused", "lost"])
def test_a_500_to_every_third_request_costs_the_run_nothing(
    prefect_server, runner, flow_run, client, tmp_path, fault
):
    """A loaded server answers 500 to every third request, of every endpoint, and to the
    claim and the Completed proposal: "refused" (the server never saw the request) or
    "lost" (it acted on it, and only its answer is a 500, so a blind retry would claim a
    claimed run or complete it twice). The run still ends Completed, once."""
    marker = tmp_path / "executions"
    run = flow_run("hello", n=4, marker=str(marker))
    lost = fault == "lost"

    with FaultProxy(prefect_server.url) as proxy:
        fails = {"content_type": "application/json", "forward": lost}
        claims = proxy.answer(
            lambda r: _set_state(r, "PENDING"), 500, INTERNAL_ERROR, times=1, **fails
        )
        completions = proxy.answer(
            lambda r: _set_state(r, "COMPLETED"), 500, INTERNAL_ERROR, times=1, **fails
        )
        every_third = proxy.answer(lambda r: True, 500, INTERNAL_ERROR, every=3, **fails)
        result = runner.run("--flow-run-id", str(run.id), PREFECT_API_URL=f"{proxy.url}/api")

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.teardowns == ["0"]
    assert (claims.hits, completions.hits) == (1, 1)
    assert every_third.hits >= 5, every_third.hits
    assert len(marker.read_text().split()) == 1  # the flow ran once
    state = client.read_flow_run(run.id).state
    assert state.is_completed() and state.result() == 8, state
    history = [s.type.value for s in client.read_flow_run_states(run.id)]
    assert history.count("PENDING") == 1 and history.count("RUNNING") == 1, history
    assert history.count("COMPLETED") == 1 and history[-1] == "COMPLETED", history


class Outage:
    """A ``match`` for the fault proxy: every request gets a 500 from the first one that
    ``starts`` it until the first one that ``ends`` it (which goes through), or until
    ``seconds`` after it started."""

    def __init__(self, starts, ends=lambda _r: False, seconds: float | None = None) -> None:
        self._starts, self._ends, self._seconds = starts, ends, seconds
        self.began: float | None = None
        self.ended: float | None = None

    def __call__(self, request: Request) -> bool:
        now = time.monotonic()
        if self.ended is None and self.began is None and self._starts(request):
            self.began = now
        if self.began is None or self.ended is not None:
            return False
        past = self._seconds is not None and now - self.began >= self._seconds
        if past or self._ends(request):
            self.ended = now
            return False
        return True

    @property
    def lasted(self) -> float:
        assert self.began is not None and self.ended is not None, "no outage"
        return self.ended - self.began


def test_500s_past_api_wait_after_the_flow_started_crash_the_run_naming_the_endpoint(
    prefect_server, runner, flow_run, client
):
    """From the engine's Running proposal on, the API answers 500 to everything; Prefect's
    client retries for --api-wait (3 s: two retries, 2 + 4 s), then the run ends Crashed,
    its message naming the endpoint and the status, once the API is back for the guard's
    report (the outage ends at the guard's first read of the run)."""
    run = flow_run("hello", n=2)
    run_path = f"/api/flow_runs/{run.id}"
    outage = Outage(
        starts=lambda r: _set_state(r, "RUNNING"),
        ends=lambda r: _from_the_runner(r) and r.method == "GET" and r.path == run_path,
    )

    with FaultProxy(prefect_server.url) as proxy:
        proxy.answer(outage, 500, INTERNAL_ERROR, content_type="application/json")
        result = runner.run(
            "--flow-run-id", str(run.id), "--api-wait", "3", "--cancel-poll-seconds", "0",
            PREFECT_API_URL=f"{proxy.url}/api",
        )  # fmt: skip

    endpoint = f"POST /flow_runs/{run.id}/set_state answered HTTP 500"
    print(
        result.stderr,
        outage.began,
        outage.ended,
        [(r.method, r.path[:60], r.headers.get("user-agent", "")[:12]) for r in proxy.requests],
    )
    line = result.assert_one_error(5, endpoint)
    assert "unreachable for 6s while running the flow" in line, line
    assert outage.lasted >= 3, outage.lasted  # not before --api-wait
    state = client.read_flow_run(run.id).state
    assert state.type.value == "CRASHED", state
    assert endpoint in state.message and "\n" not in state.message, state.message


def test_a_claim_applied_unheard_and_then_an_outage_past_api_wait_give_the_run_back(
    prefect_server, runner, flow_run, client
):
    """The server takes the claim but its answer is lost, and then answers nothing but 500
    for longer than --api-wait: the worker cannot know the run is its own, and exits 3;
    the guard, once the API is back, finds the run Pending with its worker's claim and
    reschedules it (AwaitingRetry), so that it is not left claimed by a runner that is
    gone."""
    run = flow_run("hello", n=2)
    # 3 s: past the worker's 2 s from its claim, and within the guard's 2 s after that.
    outage = Outage(starts=lambda r: _set_state(r, "PENDING"), seconds=3)

    with FaultProxy(prefect_server.url) as proxy:
        # Forwarded: the claim is applied (its answer lost), the reads change nothing.
        proxy.answer(outage, 500, INTERNAL_ERROR, content_type="application/json", forward=True)
        result = runner.run(
            "--flow-run-id", str(run.id), "--api-wait", "2", "--cancel-poll-seconds", "0",
            PREFECT_API_URL=f"{proxy.url}/api",
        )  # fmt: skip

    line = result.assert_one_error(3, "unreachable for 2s while claiming the run")
    assert "answered HTTP 500" in line and "rescheduled (AwaitingRetry)" in line, line
    state = client.read_flow_run(run.id).state
    assert state.type.value == "SCHEDULED" and state.name == "AwaitingRetry", state
