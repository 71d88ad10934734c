"""End to end: `python -m runner --flow-run-id ID` against a real Prefect server."""

from __future__ import annotations

import os
import signal
import uuid

from tests.helpers import pid_alive, unused_api_url, wait_for_file


def _logs(client, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def _state(client, flow_run_id):
    return client.read_flow_run(flow_run_id).state


def test_completed_flow_reports_result_and_logs(runner, flow_run, client):
    run = flow_run("hello", n=21)

    result = runner.run("--flow-run-id", str(run.id))

    assert result.returncode == 0, result.stderr
    state = _state(client, run.id)
    assert state.is_completed()
    assert state.result() == 42
    logs = _logs(client, run.id)
    assert "hello from the worker, n=21" in logs
    assert any("prefect-vm-runner" in line and "claimed flow run" in line for line in logs)
    assert result.teardowns == ["0"]
    # The run's directory and log file are gone (--keep-workdir keeps them); caches stay.
    assert not (result.workdir / "runs" / str(run.id)).exists()
    assert list((result.workdir / "logs").iterdir()) == []
    assert runner.written_outside_workdir() == []


def test_run_subcommand_and_prefect_worker_variable(runner, flow_run, client):
    run = flow_run("hello", n=1)

    result = runner.run("run", PREFECT__FLOW_RUN_ID=str(run.id))

    assert result.returncode == 0, result.stderr
    assert _state(client, run.id).is_completed()
    assert result.teardowns == ["0"]


def test_async_flow_completes(runner, flow_run, client):
    run = flow_run("async_hello", n=5)

    result = runner.run("--flow-run-id", str(run.id))

    assert result.returncode == 0, result.stderr
    state = _state(client, run.id)
    assert state.is_completed()
    assert state.result() == 6


def test_failing_flow_is_failed_with_exit_code_1(runner, flow_run, client):
    run = flow_run("fails")

    result = runner.run("--flow-run-id", str(run.id))

    assert result.returncode == 1
    state = _state(client, run.id)
    assert state.is_failed()
    assert "boom" in (state.message or "") or "boom" in "\n".join(_logs(client, run.id))
    assert result.teardowns == ["1"]


def test_unknown_flow_run_id(runner):
    missing = uuid.uuid4()

    result = runner.run("--flow-run-id", str(missing))

    assert result.returncode == 2
    errors = result.error_lines()
    assert len(errors) == 1 and str(missing) in errors[0] and "does not exist" in errors[0]
    assert result.teardowns == ["2"]
    assert runner.written_outside_workdir() == []


def test_malformed_flow_run_id(runner):
    result = runner.run("--flow-run-id", "not-a-uuid")

    assert result.returncode == 2
    errors = result.error_lines()
    assert len(errors) == 1 and "is not a UUID" in errors[0]
    assert result.teardowns == ["2"]
    assert runner.written_outside_workdir() == []


def test_missing_api_url_is_a_config_error(runner):
    result = runner.run("--flow-run-id", str(uuid.uuid4()), PREFECT_API_URL="")

    assert result.returncode == 2
    errors = result.error_lines()
    assert len(errors) == 1 and "PREFECT_API_URL is not set" in errors[0]
    assert result.teardowns == ["2"]
    assert runner.written_outside_workdir() == []


def test_api_unreachable_gives_up_after_api_wait(runner):
    result = runner.run(
        "--flow-run-id", str(uuid.uuid4()), "--api-wait", "1", PREFECT_API_URL=unused_api_url()
    )

    assert result.returncode == 3
    errors = result.error_lines()
    assert len(errors) == 1 and "unreachable for 1s" in errors[0]
    assert result.teardowns == ["3"]
    assert runner.written_outside_workdir() == []


def test_completed_run_is_not_executed_again(runner, flow_run, client, tmp_path):
    marker = tmp_path / "executions.txt"
    run = flow_run("hello", n=2, marker=str(marker))
    assert runner.run("--flow-run-id", str(run.id)).returncode == 0
    runner.teardown_log.unlink()

    again = runner.run("--flow-run-id", str(run.id))

    assert again.returncode == 4
    errors = again.error_lines()
    assert len(errors) == 1 and "already Completed" in errors[0]
    assert len(marker.read_text().split()) == 1
    assert _state(client, run.id).is_completed()
    assert again.teardowns == ["4"]
    assert runner.written_outside_workdir() == []


def test_code_that_cannot_load_crashes_the_run(runner, flow_run, client):
    run = flow_run("hello", entrypoint="missing.py:nothing_here")

    result = runner.run("--flow-run-id", str(run.id))

    assert result.returncode == 3
    state = _state(client, run.id)
    assert state.is_crashed()
    assert "could not load the flow's code" in state.message
    assert len(result.error_lines()) == 1
    assert result.teardowns == ["3"]
    assert runner.written_outside_workdir() == []


def test_worker_killed_mid_flow_is_crashed_with_reason(runner, flow_run, client, tmp_path):
    pid_file = tmp_path / "worker.pid"
    run = flow_run("sleeper", pid_file=str(pid_file))
    proc = runner.start("--flow-run-id", str(run.id))

    worker_pid = int(wait_for_file(pid_file))
    assert worker_pid != proc.pid
    os.kill(worker_pid, signal.SIGKILL)
    result = runner.finish(proc)

    assert result.returncode == 5
    state = _state(client, run.id)
    assert state.is_crashed()
    assert "killed by SIGKILL" in state.message and "peak RSS" in state.message
    assert any("killed by SIGKILL" in line for line in _logs(client, run.id))
    assert result.teardowns == ["5"]


def test_sigint_to_guard_stops_worker_and_crashes_the_run(runner, flow_run, client, tmp_path):
    """Ctrl-C. (SIGTERM is a preemption: tests/integration/test_lifecycle.py.)"""
    pid_file = tmp_path / "worker.pid"
    run = flow_run("sleeper", pid_file=str(pid_file))
    proc = runner.start("--flow-run-id", str(run.id), "--cancel-grace-seconds", "20")
    worker_pid = int(wait_for_file(pid_file))

    proc.send_signal(signal.SIGINT)
    result = runner.finish(proc)

    assert result.returncode == 5
    assert not pid_alive(worker_pid)
    state = _state(client, run.id)
    assert state.is_final() and not state.is_running()
    assert state.is_crashed()
    assert result.teardowns == ["5"]


def test_run_made_pending_by_a_prefect_worker_is_executed(runner, flow_run, client):
    """Prefect workers propose Pending before they start their command (our runner)."""
    from prefect.states import Pending

    run = flow_run("hello", n=3)
    client.set_flow_run_state(run.id, Pending())

    result = runner.run("--flow-run-id", str(run.id))

    assert result.returncode == 0, result.stderr
    assert client.read_flow_run(run.id).state.result() == 6


def test_api_refusing_the_key_is_a_config_error(runner, tmp_path):
    from devtools.storage_servers import HttpFileServer

    with HttpFileServer(tmp_path) as server:
        server.fail(401)
        result = runner.run(
            "--flow-run-id",
            str(uuid.uuid4()),
            PREFECT_API_URL=f"{server.url}/api",
            PREFECT_API_KEY="pnu_planted_secret_key",
        )

    assert result.returncode == 2
    errors = result.error_lines()
    assert len(errors) == 1 and "HTTP 401" in errors[0] and "PREFECT_API_KEY" in errors[0]
    assert "pnu_planted_secret_key" not in result.stderr + result.stdout
    assert result.teardowns == ["2"]
