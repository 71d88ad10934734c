"""`doctor` and the zombie automation: a VM that dies without tearing down gets its flow
run marked Crashed by the real server's triggers; a clean exit never does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from runner.telemetry.zombies import NAME
from tests.helpers import unused_api_url, wait_for_file


def _automations(api_url: str) -> list[dict]:
    response = httpx.post(f"{api_url}/automations/filter", json={"limit": 200})
    response.raise_for_status()
    return [found for found in response.json() if found["name"] == NAME]


@pytest.fixture
def no_automation(prefect_server):
    """The session's server has no zombie automation before and after the test (it would
    crash other tests' runs that beat slower than its window)."""

    def remove() -> None:
        for found in _automations(prefect_server.api_url):
            httpx.delete(f"{prefect_server.api_url}/automations/{found['id']}").raise_for_status()

    remove()
    yield
    remove()


def _wait_for_state(client, flow_run_id, state: str, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        found = client.read_flow_run(flow_run_id).state
        if found.type.value == state or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_doctor_reports_each_check_and_installs_the_automation_once(
    runner, prefect_server, no_automation
):
    checked = runner.cli("doctor", "--workdir", str(runner.workdir))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = {line.split()[1]: line for line in checked.stdout.splitlines()}
    assert set(lines) == {"prefect-api", "workdir", "uv", "containers", "machine", "automation"}
    assert lines["prefect-api"].startswith("ok") and prefect_server.api_url in lines["prefect-api"]
    assert lines["workdir"].startswith("ok") and lines["uv"].startswith("ok")
    assert lines["automation"].startswith("--") and "--install-automation" in lines["automation"]

    installed = runner.cli("doctor", "--install-automation", "--heartbeat-seconds", "20")
    again = runner.cli("doctor", "--install-automation", "--missed-heartbeats", "4")
    assert installed.returncode == 0 and again.returncode == 0, installed.stderr + again.stderr
    assert "ok   automation  installed " in installed.stdout
    assert "ok   automation  updated " in again.stdout
    (automation,) = _automations(prefect_server.api_url)  # one, updated in place
    assert automation["trigger"]["within"] == 120  # 4 missed heartbeats of 30 s
    assert automation["trigger"]["posture"] == "Proactive"
    assert automation["actions"][0]["state"] == "CRASHED"


def test_the_printed_automation_json_is_what_prefects_cli_creates(
    runner, prefect_server, no_automation, tmp_path
):
    printed = runner.cli("doctor", "--automation-json", "--heartbeat-seconds", "10")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout)["trigger"]["within"] == 30
    path = tmp_path / "zombies.json"
    path.write_text(printed.stdout)
    created = subprocess.run(
        [sys.executable, "-m", "prefect", "automation", "create", "-f", str(path)],
        env=runner.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    seen = runner.cli("doctor")
    assert "ok   automation  zombie automation " in seen.stdout


def test_doctor_fails_with_a_line_per_problem(runner, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    checked = runner.cli("doctor", "--workdir", str(not_a_dir), PREFECT_API_URL=unused_api_url())
    assert checked.returncode == 2
    lines = {line.split()[1]: line for line in checked.stdout.splitlines()}
    assert lines["prefect-api"].startswith("FAIL") and "unreachable" in lines["prefect-api"]
    assert lines["workdir"].startswith("FAIL") and str(not_a_dir) in lines["workdir"]
    assert "automation" not in lines  # nothing to ask without an API

    zero = runner.cli("doctor", "--install-automation", "--heartbeat-seconds", "0")
    assert zero.returncode == 2
    assert "needs heartbeats" in zero.stderr and len(zero.stderr.strip().splitlines()) == 1


def test_a_vm_that_dies_is_crashed_by_the_automation_and_a_clean_exit_is_not(
    runner, flow_run, client, no_automation, tmp_path
):
    installed = runner.cli("doctor", "--install-automation", "--heartbeat-seconds", "1")
    assert installed.returncode == 0, installed.stdout + installed.stderr  # window: 10 s

    clean = flow_run("hello")
    ended = runner.run("--flow-run-id", str(clean.id), "--heartbeat-seconds", "1")
    assert ended.returncode == 0, ended.stderr

    pid_file = tmp_path / "worker.pid"
    zombie = flow_run("sleeper", pid_file=str(pid_file), seconds=300)
    proc = runner.start("--flow-run-id", str(zombie.id), "--heartbeat-seconds", "1")
    worker_pid = int(wait_for_file(pid_file))
    time.sleep(2)  # a few heartbeats arrive
    # The VM dies: guard and worker together, nobody left to report.
    os.kill(proc.pid, signal.SIGKILL)
    os.kill(worker_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    proc.communicate(timeout=30)
    assert client.read_flow_run(zombie.id).state.type.value == "RUNNING"

    state = _wait_for_state(client, zombie.id, "CRASHED", timeout=90)
    assert state.type.value == "CRASHED", state
    assert "No heartbeat for 10s" in state.message
    assert time.monotonic() - killed_at >= 8  # not before the window ran out
    assert client.read_flow_run(clean.id).state.type.value == "COMPLETED"
    assert runner.teardown_log.read_text().split() == ["0"]  # only the clean run tore down
