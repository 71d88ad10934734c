"""How a run ends whatever happens: cancellation (and, later, preemption and deadlines)."""

from __future__ import annotations

import time

from prefect.states import Cancelling

from tests.helpers import pid_alive, wait_for_file


def test_cancel_ends_the_run_cancelled_with_its_hooks_run(runner, flow_run, client, tmp_path):
    pid_file, marker = tmp_path / "worker.pid", tmp_path / "hook"
    run = flow_run("cancellable", pid_file=str(pid_file), marker=str(marker))
    # No poll: the events websocket alone must tell the guard.
    proc = runner.start("--flow-run-id", str(run.id), "--cancel-poll-seconds", "0")
    worker_pid = int(wait_for_file(pid_file))
    time.sleep(1)

    asked = time.monotonic()
    client.set_flow_run_state(run.id, Cancelling(), force=True)
    result = runner.finish(proc, timeout=60)
    took = time.monotonic() - asked

    assert result.returncode == 1, result.stderr
    state = client.read_flow_run(run.id).state
    assert state.type.value == "CANCELLED", state
    assert marker.read_text() == "on_cancellation ran in CANCELLING"
    assert not pid_alive(worker_pid)
    assert result.teardowns == ["1"]
    assert took < 10, took
    assert result.error_lines() == [], result.stderr


def test_cancel_during_a_slow_code_pull_stops_the_worker_and_the_guard_cancels(
    runner, flow_run, client, tmp_path
):
    from devtools.storage_servers import HttpFileServer
    from tests.conftest import FLOWS_DIR

    root = tmp_path / "served"
    pushed = runner.cli("bundle", "push", str(FLOWS_DIR), "--to", str(root))
    assert pushed.returncode == 0, pushed.stderr
    name = pushed.stdout.strip().rsplit("/", 1)[1]
    step = {"runner.steps.pull_bundle": {"url": ""}}
    with HttpFileServer(root) as http:
        http.delay = 30.0  # the pull is still going when the cancel comes
        step["runner.steps.pull_bundle"]["url"] = f"{http.url}/{name}"
        run = flow_run("hello", path=None, pull_steps=[step])
        proc = runner.start("--flow-run-id", str(run.id))
        deadline = time.monotonic() + 30
        while client.read_flow_run(run.id).state.type.value != "PENDING":
            assert time.monotonic() < deadline, "never claimed"
            time.sleep(0.2)
        time.sleep(1)
        client.set_flow_run_state(run.id, Cancelling(), force=True)
        result = runner.finish(proc, timeout=60)

    assert result.returncode == 1, result.stderr
    state = client.read_flow_run(run.id).state
    assert state.type.value == "CANCELLED", state
    assert "cancelled while preparing the flow run" in state.message
    assert result.teardowns == ["1"]
