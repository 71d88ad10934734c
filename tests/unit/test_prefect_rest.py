"""runner/prefect_rest.py's one error mapping and its retries, against a loopback HTTP
server that answers what each case needs."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from runner.errors import ApiUnreachable, ConfigError, ExitCode, FlowRunNotFound
from runner.prefect_rest import ApiBusy, PrefectRest, RunApi

RUN = uuid.UUID("0b5c8a3e-0000-4000-8000-000000000001")


class Api:
    """Answers each request with the next (status, body) queued for its path; 200 {} after."""

    def __init__(self) -> None:
        self.answers: dict[str, list[tuple[int, object]]] = {}
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


def test_a_busy_api_past_the_wait_is_exit_3_with_the_last_status(api):
    api.answers[f"flow_runs/{RUN}"] = [(500, {})] * 50
    with RunApi(RUN, api_wait=0.6) as rest, pytest.raises(ApiBusy) as raised:
        rest.read_flow_run()
    assert raised.value.exit_code == ExitCode.BOOTSTRAP_ERROR
    assert "unreachable for 0.6s (HTTP 500)" in str(raised.value)


def test_no_answer_at_all_is_the_same_error(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # discard: refused
    with RunApi(RUN, api_wait=0.3) as rest, pytest.raises(ApiBusy, match=r"\(ConnectError\)"):
        rest.read_flow_run()


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
        "failed while writing the artifact (HTTP 422): key must be lowercase"
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
