"""How a run ends whatever happens: cancellation, preemption (SIGTERM, spot notices),
deadlines, duplicate runners; and the teardown, exactly once, after each."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import prefect
import pytest
from packaging.version import Version
from prefect.states import Cancelling

from devtools.metadata_servers import MetadataServer
from tests.conftest import Runner
from tests.helpers import pid_alive, read_events, wait_for_file
from tests.planted import PREFIX, record


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


def _preempted_events(server, run_id) -> list[dict]:
    return read_events(
        server.api_url, event="runner.preempted", resource_id=f"prefect.flow-run.{run_id}"
    )


def _sigterm_once_running(runner, run_id, pid_file, *flags):
    """Start a runner and SIGTERM it once the flow runs: its result, and the worker's pid."""
    proc = runner.start("--flow-run-id", str(run_id), *flags)
    worker_pid = int(wait_for_file(pid_file))
    proc.send_signal(signal.SIGTERM)
    return runner.finish(proc, timeout=60), worker_pid


def test_sigterm_reschedules_the_run_without_spending_its_retries(
    runner, flow_run, client, prefect_server, tmp_path
):
    pid_file, release = tmp_path / "worker.pid", tmp_path / "release"
    run = flow_run("preemptible", pid_file=str(pid_file), release_file=str(release))

    result, worker_pid = _sigterm_once_running(runner, run.id, pid_file)

    assert result.returncode == 0, result.stderr
    assert result.teardowns == ["0"]
    assert not pid_alive(worker_pid)
    rescheduled = client.read_flow_run(run.id)
    assert rescheduled.state.name == "AwaitingRetry", rescheduled.state
    assert rescheduled.state.message == "preempted (SIGTERM)"
    assert rescheduled.empirical_policy.retries == 2  # the flow's 1, and 1 for the preemption
    [event] = _preempted_events(prefect_server, run.id)
    assert event["payload"]["reason"] == "SIGTERM"
    assert event["payload"]["rescheduled"] is True

    # Another machine picks it up: Scheduled again, so it can be claimed and completes.
    release.write_text("go")
    again = runner.run("--flow-run-id", str(run.id))
    assert again.returncode == 0, again.stderr
    state = client.read_flow_run(run.id).state
    assert state.is_completed() and state.result() == 2  # the second attempt
    assert again.teardowns == ["0", "0"]  # one per runner process, the same log file


def test_sigterm_with_the_crash_policy_crashes_the_run(
    runner, flow_run, client, prefect_server, tmp_path
):
    pid_file = tmp_path / "worker.pid"
    run = flow_run("sleeper", pid_file=str(pid_file))

    result, worker_pid = _sigterm_once_running(runner, run.id, pid_file, "--on-preemption", "crash")

    assert result.returncode == 5, result.stderr
    assert result.teardowns == ["5"]
    assert not pid_alive(worker_pid)
    state = client.read_flow_run(run.id).state
    assert state.is_crashed() and state.message == "preempted (SIGTERM)", state
    assert runner.written_outside_workdir() == []
    [event] = _preempted_events(prefect_server, run.id)
    assert event["payload"]["rescheduled"] is False
    assert event["payload"]["policy"] == "crash"


def test_a_guard_killed_outright_takes_its_worker_with_it(runner, flow_run, client, tmp_path):
    """SIGKILL to the guard (nothing it can catch): the kernel stops the worker too, whose
    engine reports the run Crashed, rather than a flow left running unsupervised."""
    pid_file = tmp_path / "worker.pid"
    run = flow_run("sleeper", pid_file=str(pid_file))
    proc = runner.start("--flow-run-id", str(run.id))
    worker_pid = int(wait_for_file(pid_file))

    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    deadline = time.monotonic() + 30
    while pid_alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(worker_pid)
    if Version(prefect.__version__) < Version("3.9"):
        # Prefect 3.6.0's engine dies of that SIGTERM without a word (seen in `make
        # test-compat`): the run is the zombie automation's, as for a VM that died.
        return
    deadline = time.monotonic() + 30
    while not (state := client.read_flow_run(run.id).state).is_final():
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    assert state.is_crashed(), state


@pytest.mark.parametrize(
    ("cloud", "says"),
    [("aws", "AWS spot"), ("gcp", "GCE"), ("azure", "Azure Scheduled Event Preempt")],
)
def test_spot_notice_on_each_clouds_protocol_reschedules_the_run(
    runner, flow_run, client, prefect_server, tmp_path, cloud, says
):
    pid_file, release = tmp_path / "worker.pid", tmp_path / "release"
    run = flow_run("preemptible", pid_file=str(pid_file), release_file=str(release))
    with MetadataServer() as imds:
        proc = runner.start(
            "--flow-run-id", str(run.id), "--cloud", cloud, "--metadata-url", imds.url,
            "--spot-poll-seconds", "0.2",
        )  # fmt: skip
        worker_pid = int(wait_for_file(pid_file))
        imds.preempt(cloud)
        result = runner.finish(proc, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.teardowns == ["0"]
    assert not pid_alive(worker_pid)
    state = client.read_flow_run(run.id).state
    assert state.name == "AwaitingRetry" and says in state.message, state
    [event] = _preempted_events(prefect_server, run.id)
    assert says in event["payload"]["reason"] and event["payload"]["rescheduled"] is True


def test_max_runtime_stops_the_worker_and_crashes_the_run(runner, flow_run, client, tmp_path):
    pid_file = tmp_path / "worker.pid"
    run = flow_run("sleeper", pid_file=str(pid_file))

    result = runner.run("--flow-run-id", str(run.id), "--max-runtime", "8", timeout=60)

    assert result.returncode == 5, result.stderr
    assert result.teardowns == ["5"]
    assert not pid_alive(int(pid_file.read_text()))
    state = client.read_flow_run(run.id).state
    assert state.is_crashed() and state.message == "exceeded max runtime of 8s", state
    assert runner.written_outside_workdir() == []


def test_two_runners_given_the_same_run_execute_it_once(prefect_server, flow_run, client, tmp_path):
    marker = tmp_path / "executions"
    run = flow_run("hello", marker=str(marker))
    runners = [Runner(prefect_server, _mkdir(tmp_path / name)) for name in ("a", "b")]

    procs = [r.start("--flow-run-id", str(run.id)) for r in runners]
    results = [r.finish(p) for r, p in zip(runners, procs, strict=True)]

    assert sorted(r.returncode for r in results) == [0, 4], [r.stderr for r in results]
    assert len(marker.read_text().split()) == 1
    assert client.read_flow_run(run.id).state.is_completed()
    for result in results:
        assert result.teardowns == [str(result.returncode)]
    loser = next(r for r in results if r.returncode == 4)
    assert "not executing it again" in loser.stderr or "could not be claimed" in loser.stderr

    # The same run delivered again later (a VM that rebooted): not executed.
    again = runners[0].run("--flow-run-id", str(run.id))
    assert again.returncode == 4
    assert len(marker.read_text().split()) == 1


def test_a_claimed_pending_run_is_not_taken_by_a_second_runner(runner, flow_run, client):
    """The claim's Pending names its runner; a Pending a Prefect worker set does not."""
    from prefect.states import Pending

    run = flow_run("hello")
    client.set_flow_run_state(
        run.id, Pending(message="claimed by prefect-vm-runner on vm-1 (pid 7)")
    )

    result = runner.run("--flow-run-id", str(run.id))

    assert result.returncode == 4
    assert result.teardowns == ["4"]
    assert "already claimed by prefect-vm-runner on vm-1" in result.stderr
    assert client.read_flow_run(run.id).state.is_pending()


def test_the_runner_waits_for_user_data_to_name_the_run(runner, flow_run, client, tmp_path):
    user_data = tmp_path / "user-data.env"
    run = flow_run("hello", n=4)
    proc = runner.start("--user-data-file", str(user_data), "--claim-timeout", "60")
    time.sleep(2)
    assert proc.poll() is None  # still waiting
    user_data.write_text(f"RUNNER_FLOW_RUN_ID={run.id}\nRUNNER_HEARTBEAT_SECONDS=5\n")

    result = runner.finish(proc)

    assert result.returncode == 0, result.stderr
    assert result.teardowns == ["0"]
    assert client.read_flow_run(run.id).state.result() == 8


def test_no_run_in_user_data_by_the_claim_deadline_tears_down(runner, tmp_path):
    result = runner.run("--user-data-file", str(tmp_path / "never.env"), "--claim-timeout", "1")

    assert result.returncode == 2
    assert result.teardowns == ["2"]
    [line] = result.error_lines()
    assert "no flow run id arrived in" in line and "within 1s" in line
    assert runner.written_outside_workdir() == []


def test_poweroff_falls_back_to_shutdown_and_happens_once(runner, flow_run, tmp_path):
    """The real poweroff is proven by booting an image (images/); here the commands are
    stand-ins on PATH: systemctl fails, as on a machine without systemd."""
    bin_dir, calls = _mkdir(tmp_path / "bin"), tmp_path / "calls"
    for name, code in (("systemctl", 1), ("shutdown", 0)):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nexit {code}\n')
        script.chmod(0o755)
    run = flow_run("hello")
    env = runner.env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    argv = [sys.executable, "-m", "runner", "--flow-run-id", str(run.id),
            "--workdir", str(runner.workdir), "--on-exit", "poweroff"]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    record(done.stdout, done.stderr)

    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == ["systemctl poweroff", "shutdown -h now"]


def test_the_runners_log_is_uploaded_to_the_log_url(runner, flow_run, tmp_path):
    bucket = tmp_path / "bucket"
    run = flow_run("hello")

    result = runner.run("--flow-run-id", str(run.id), "--log-url", bucket.as_uri())

    assert result.returncode == 0, result.stderr
    assert result.teardowns == ["0"]
    [uploaded] = (bucket / str(run.id)).iterdir()
    text = uploaded.read_text()
    assert f"claimed flow run {run.id}" in text  # the worker's lines
    assert "guard pid" in text and "finished: Completed" in text  # and the guard's
    assert PREFIX not in text
    assert not (runner.workdir / "runs" / str(run.id)).exists()


def _mkdir(path):
    path.mkdir()
    return path


def test_a_log_url_that_cannot_be_used_costs_the_log_only(runner, flow_run):
    run = flow_run("hello")

    result = runner.run("--flow-run-id", str(run.id), "--log-url", "s3://[not-a-bucket/logs")

    assert result.returncode == 0, result.stderr
    assert result.teardowns == ["0"]
    [line] = result.error_lines()
    assert "could not upload the runner's log to --log-url" in line
