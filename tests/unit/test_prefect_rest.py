"""runner/prefect_rest.py's one error mapping and its retries, against a loopback HTTP
server that answers what each case needs."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from runner.errors import (
    ApiUnreachable,
    CodeLoadError,
    ConfigError,
    ExitCode,
    FlowRunNotFound,
    NotExecuted,
)
from runner.prefect_rest import (
    ApiBusy,
    ApiLost,
    PrefectRest,
    RunApi,
    api_failure,
    prefect_client_retries,
    prefect_client_seconds,
)

RUN = uuid.UUID("0b5c8a3e-0000-4000-8000-000000000001")


class Api:
    """Answers each request with the next (status, body) queued for its path; 200 {} after.
    A path in ``handlers`` is answered by its function instead: (method, body) -> (status,
    body)."""

    def __init__(self) -> None:
        self.answers: dict[str, list[tuple[int, object]]] = {}
        self.handlers: dict[str, Callable[[str, Any], tuple[int, object]]] = {}
        self.seen: list[str] = []
        self.bodies: list[object] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                api.bodies.append(json.loads(raw) if raw else None)
                path = self.path.removeprefix("/api/")
                api.seen.append(f"{self.command} {path}")
                queued = api.answers.get(path) or []
                if path in api.handlers:
                    status, body = api.handlers[path](self.command, api.bodies[-1])
                else:
                    status, body = queued.pop(0) if queued else (200, {})
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/api"


@pytest.fixture
def api(monkeypatch) -> Iterator[Api]:
    served = Api()
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PREFECT_API_URL", served.url)
    monkeypatch.delenv("PREFECT_API_KEY", raising=False)
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    yield served
    served.server.shutdown()
    served.server.server_close()


def test_a_busy_api_is_asked_again_within_the_wait(api):
    path = f"flow_runs/{RUN}"
    api.answers[path] = [(503, {}), (500, {}), (429, {}), (200, {"id": str(RUN)})]
    with RunApi(RUN, api_wait=10) as rest:
        assert rest.read_flow_run() == {"id": str(RUN)}
    assert api.seen.count(f"GET {path}") == 4


def test_a_busy_api_past_the_wait_is_exit_3_naming_the_endpoint_and_last_status(api):
    api.answers[f"flow_runs/{RUN}"] = [(500, {})] * 50
    with RunApi(RUN, api_wait=0.6) as rest, pytest.raises(ApiBusy) as raised:
        rest.read_flow_run()
    assert raised.value.exit_code == ExitCode.BOOTSTRAP_ERROR
    line = str(raised.value)
    assert (
        f"unreachable for 0.6s while reading the flow run: GET /flow_runs/{RUN} answered "
        "HTTP 500; check PREFECT_API_URL" in line
    ), line
    assert "\n" not in line


def test_no_answer_at_all_is_the_same_error(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # discard: refused
    with RunApi(RUN, api_wait=0.3) as rest, pytest.raises(ApiBusy) as raised:
        rest.read_flow_run()
    assert f"GET /flow_runs/{RUN} got no answer (ConnectError)" in str(raised.value)


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_is_a_configuration_error_and_not_retried(api, status):
    api.answers[f"flow_runs/{RUN}"] = [(status, {"detail": "bad key"})]
    with RunApi(RUN, api_wait=10) as rest, pytest.raises(ConfigError) as raised:
        rest.read_flow_run()
    assert raised.value.exit_code == ExitCode.CONFIG_ERROR
    assert f"(HTTP {status}); check PREFECT_API_KEY" in str(raised.value)
    assert len(api.seen) == 1


def test_another_4xx_says_what_the_server_said_and_is_not_retried(api):
    api.answers["artifacts/"] = [(422, {"detail": "key must be lowercase"})]
    with PrefectRest(api_wait=10) as rest, pytest.raises(ApiUnreachable) as raised:
        rest.create_artifact({"key": "X"})
    assert not isinstance(raised.value, ApiBusy)
    assert str(raised.value).endswith(
        "failed while writing the artifact: POST /artifacts/ answered HTTP 422: "
        "key must be lowercase"
    )
    assert len(api.seen) == 1


def test_a_missing_run_names_the_run(api):
    api.answers[f"flow_runs/{RUN}"] = [(404, {"detail": "Flow run not found"})]
    with RunApi(RUN, api_wait=10) as rest, pytest.raises(FlowRunNotFound, match=str(RUN)):
        rest.read_flow_run()


def test_an_api_without_post_events_says_so(api):
    api.answers["events"] = [(404, {}), (200, {})]
    with PrefectRest() as rest:
        assert rest.post_events([{"event": "x"}]) is False
        assert rest.post_events([{"event": "x"}]) is True


def test_events_are_sent_once_a_busy_answer_is_for_the_caller_to_retry(api):
    api.answers["events"] = [(503, {})]
    with PrefectRest(api_wait=10) as rest, pytest.raises(ApiBusy) as raised:
        rest.post_events([{"event": "x"}])
    assert raised.value.problem == "HTTP 503"
    assert api.seen == ["POST events"]


def test_a_forced_crash_sets_the_state_and_says_so_in_the_runs_logs(api):
    with RunApi(RUN, api_wait=10) as rest:
        rest.crash("worker process was killed by SIGKILL")
    assert api.seen == [f"POST flow_runs/{RUN}/set_state", "POST logs/"]
    proposed, logged = api.bodies
    assert proposed["force"] is True
    assert proposed["state"]["type"] == "CRASHED"
    assert proposed["state"]["message"] == "worker process was killed by SIGKILL"
    assert [line["message"] for line in logged] == ["worker process was killed by SIGKILL"]
    assert logged[0]["flow_run_id"] == str(RUN)


class Run:
    """One flow run behind the loopback API, with the two orchestration rules a claim meets
    (a repeated transition id is refused with the state it set; Pending to Pending is
    aborted), and a fault per ``set_state``, in order: "busy" (500, not applied), "lost"
    (applied, then 500: the answer is lost), "late" (500 now, applied just before the next
    proposal: a read in between still sees the old state), "stolen" (another runner's
    claim lands, and this one gets 500)."""

    OTHER = "claimed by prefect-vm-runner on vm-2 (pid 9)"

    def __init__(self, api: Api, *, state: str = "SCHEDULED", keeps_ids: bool = True) -> None:
        self.state: dict[str, Any] = {"type": state, "name": state.title(), "state_details": {}}
        self.faults: list[str] = []
        self.keeps_ids = keeps_ids
        self._late: dict[str, Any] | None = None
        api.handlers[f"flow_runs/{RUN}"] = self.read
        api.handlers[f"flow_runs/{RUN}/set_state"] = self.set_state

    def read(self, method: str, _body: Any) -> tuple[int, object]:
        if method == "PATCH":
            return 204, {}
        flow_run = {"id": str(RUN), "flow_id": str(uuid.uuid4()), "run_count": 0}
        return 200, {**flow_run, "state": self.state, "empirical_policy": {}}

    def set_state(self, _method: str, body: Any) -> tuple[int, object]:
        if self._late is not None:
            self._orchestrate(self._late)
            self._late = None
        fault = self.faults.pop(0) if self.faults else ""
        if fault == "busy":
            return 500, {"exception_message": "Internal Server Error"}
        if fault == "late":
            self._late = body["state"]
            return 500, {"exception_message": "Internal Server Error"}
        if fault == "stolen":
            self.state = {"type": "PENDING", "name": "Pending", "message": self.OTHER}
            return 500, {"exception_message": "Internal Server Error"}
        result = self._orchestrate(body["state"])
        return (500, {}) if fault == "lost" else (201, result)

    def _orchestrate(self, proposed: dict[str, Any]) -> dict[str, Any]:
        wanted = (proposed.get("state_details") or {}).get("transition_id")
        kept = (self.state.get("state_details") or {}).get("transition_id")
        if wanted and kept == wanted:
            reason = "This run has already made this state transition."
            return {"status": "REJECT", "state": self.state, "details": {"reason": reason}}
        if self.state["type"] == "PENDING" and proposed["type"] == "PENDING":
            reason = "This run is in a PENDING state and cannot transition to a PENDING state."
            return {"status": "ABORT", "state": None, "details": {"reason": reason}}
        details = dict(proposed.get("state_details") or {})
        if not self.keeps_ids:
            details.pop("transition_id", None)
        self.state = {**proposed, "state_details": details}
        return {"status": "ACCEPT", "state": self.state, "details": {}}


def _claims(api: Api) -> int:
    return api.seen.count(f"POST flow_runs/{RUN}/set_state")


def _is_our_claim(state: dict[str, Any]) -> bool:
    return (
        state["type"] == "PENDING"
        and state["message"].startswith("claimed by prefect-vm-runner on ")
        and not state["message"].startswith(Run.OTHER)
    )


def test_a_claim_the_server_applied_but_whose_answer_was_lost_is_ours_not_sent_again(api):
    run = Run(api)
    run.faults = ["lost"]
    with RunApi(RUN, api_wait=10) as rest:
        claimed = rest.claim()
    assert _is_our_claim(claimed["state"]) and claimed["state"] == run.state
    assert _claims(api) == 1  # read back, not proposed again
    assert api.seen[-1] == f"GET flow_runs/{RUN}"


def test_a_claim_that_did_not_get_through_is_sent_again_within_the_wait(api):
    run = Run(api)
    run.faults = ["busy", "busy"]
    with RunApi(RUN, api_wait=10) as rest:
        claimed = rest.claim()
    assert _is_our_claim(claimed["state"]) and claimed["state"] == run.state
    assert _claims(api) == 3
    # Each repeat comes after a read that found the run still Scheduled.
    proposals = [b for b in api.bodies if isinstance(b, dict) and "state" in b]
    ids = {p["state"]["state_details"]["transition_id"] for p in proposals}
    assert len(ids) == 1  # one claim, sent three times


def test_a_repeat_of_a_claim_applied_late_is_refused_as_a_duplicate_and_taken_as_ours(api):
    run = Run(api)
    run.faults = ["late"]
    with RunApi(RUN, api_wait=10) as rest:
        claimed = rest.claim()
    assert _is_our_claim(claimed["state"])
    assert _claims(api) == 2


def test_a_server_that_keeps_no_transition_id_knows_the_claim_by_its_message(api):
    run = Run(api, keeps_ids=False)
    run.faults = ["late"]  # the repeat is aborted (Pending to Pending): the read says ours
    with RunApi(RUN, api_wait=10) as rest:
        claimed = rest.claim()
    assert _is_our_claim(claimed["state"])
    assert "transition_id" not in claimed["state"]["state_details"]


def test_a_run_another_runner_claimed_while_our_answer_was_lost_is_not_executed(api):
    run = Run(api)
    run.faults = ["stolen"]
    with RunApi(RUN, api_wait=10) as rest, pytest.raises(NotExecuted) as raised:
        rest.claim()
    assert "was taken while claiming it: it is Pending (claimed by prefect-vm-runner on vm-2" in (
        str(raised.value)
    )
    assert raised.value.exit_code == ExitCode.NOT_EXECUTED
    assert _claims(api) == 1


def test_a_claim_failing_past_the_wait_names_the_endpoint_and_leaves_the_run_scheduled(api):
    run = Run(api)
    run.faults = ["busy"] * 100
    with RunApi(RUN, api_wait=0.6) as rest, pytest.raises(ApiBusy) as raised:
        rest.claim()
    assert raised.value.exit_code == ExitCode.BOOTSTRAP_ERROR
    assert (
        f"unreachable for 0.6s while claiming the run: POST /flow_runs/{RUN}/set_state "
        "answered HTTP 500; check PREFECT_API_URL" in str(raised.value)
    )
    assert run.state["type"] == "SCHEDULED"
    assert _claims(api) >= 2


def test_a_reschedule_applied_but_whose_answer_was_lost_counts_as_done(api):
    run = Run(api, state="RUNNING")
    run.faults = ["lost"]
    with RunApi(RUN, api_wait=10) as rest:
        assert rest.reschedule("preempted (spot)", run_count_at_claim=0) is True
    assert run.state["name"] == "AwaitingRetry"
    assert _claims(api) == 2  # the repeat was refused as a duplicate: it is ours


def test_log_lines_are_written_again_after_a_busy_answer(api):
    api.answers["logs/"] = [(503, {}), (500, {}), (201, [])]
    with RunApi(RUN, api_wait=10) as rest:
        rest.log([(20, "hello", datetime.now(timezone.utc))])
    assert api.seen.count("POST logs/") == 3


@pytest.mark.parametrize("api_wait", [0, 1, 3, 10, 60, 300])
def test_prefects_client_gets_retries_that_cover_the_api_wait_with_its_jitter(api_wait):
    retries = prefect_client_retries(api_wait)
    assert 0.8 * prefect_client_seconds(retries) >= api_wait
    if retries:  # and no more than that
        assert 0.8 * prefect_client_seconds(retries - 1) < api_wait
    assert prefect_client_retries(60) == 6


def _status_error(url: str, status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", url)
    response = httpx.Response(status, request=request)
    return httpx.HTTPStatusError(
        f"Server error '{status}' for url '{url}'\nResponse: ...\nFor more information",
        request=request,
        response=response,
    )


def _wrapped(error: Exception) -> CodeLoadError:
    try:
        try:
            raise error
        except Exception as exc:
            raise CodeLoadError("could not load the flow's code") from exc
    except CodeLoadError as wrapped:
        return wrapped


def test_a_prefect_client_error_becomes_one_line_naming_endpoint_and_status(api):
    error = _status_error(f"{api.url}/flow_runs/{RUN}/set_state", 500)
    lost = api_failure(_wrapped(error), doing="running the flow", seconds=6)
    assert isinstance(lost, ApiLost) and lost.exit_code == ExitCode.CRASHED
    assert str(lost) == (
        f"Prefect API at {api.url} unreachable for 6s while running the flow: "
        f"POST /flow_runs/{RUN}/set_state answered HTTP 500; check PREFECT_API_URL and the "
        "network, or raise --api-wait"
    )
    before = api_failure(error, doing="loading the flow's code", seconds=6, error=ApiBusy)
    assert type(before) is ApiBusy and before.exit_code == ExitCode.BOOTSTRAP_ERROR

    timeout = httpx.ReadTimeout("timed out", request=httpx.Request("GET", f"{api.url}/x"))
    assert "GET /x got no answer (ReadTimeout)" in str(
        api_failure(timeout, doing="running the flow", seconds=6)
    )


def test_other_errors_are_not_taken_for_an_api_failure(api):
    assert api_failure(ValueError("boom"), doing="running the flow", seconds=6) is None
    not_retried = _status_error(f"{api.url}/flow_runs/{RUN}/set_state", 422)
    assert api_failure(not_retried, doing="running the flow", seconds=6) is None
    elsewhere = _status_error("http://127.0.0.2:1/repo.git", 500)  # a pull step's server
    assert api_failure(_wrapped(elsewhere), doing="loading the flow's code", seconds=6) is None
