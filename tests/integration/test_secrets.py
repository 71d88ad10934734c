"""No secret comes out: the runner's lines, the flow's logs, process listings, and, at the
end of the session, everything every test captured and everything the server stored."""

from __future__ import annotations

import time

import psutil
import pytest

from tests.planted import PREFIX, SESSION_SECRETS, TRANSCRIPT, leaks, planted


def _logs(client, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    found = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [entry.message for entry in found]


def test_secret_env_values_are_masked_in_the_flows_logs_and_never_in_a_command_line(
    runner, flow_run, client
):
    run = flow_run("leaky", seconds=3)
    proc = runner.start("--flow-run-id", str(run.id))
    command_lines = []
    while proc.poll() is None:
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            command_lines += [" ".join(p.cmdline()) for p in family]
        except psutil.Error:  # a process ended while we looked
            pass
        time.sleep(0.2)
    result = runner.finish(proc)

    assert result.returncode == 0, result.stderr
    assert len(command_lines) > 5  # the run was watched while it ran
    messages = "\n".join(_logs(client, run.id))
    assert "the secret is ***" in messages
    assert "again: ***" in messages
    assert "RuntimeError: an error naming ***" in messages
    for text in (messages, result.stdout, result.stderr, *command_lines):
        assert PREFIX not in text


def test_the_leak_check_finds_a_planted_value_without_repeating_it(tmp_path):
    secret = planted("control")
    (tmp_path / "out.log").write_text(f"one line\nkey={secret} here\n")
    found = leaks(tmp_path / "out.log")
    assert len(found) == 1 and "key=" in found[0]
    assert secret not in found[0]


@pytest.mark.last
def test_no_planted_secret_in_any_output_of_the_session_or_in_the_server(prefect_server):
    """Runs last: every runner the session started had the planted secrets in its
    environment; none of them may be in what the tests captured or the server stored."""
    assert set(SESSION_SECRETS) == {"PREFECT_API_KEY", "RVM_PLANTED_SECRET"}
    time.sleep(2)  # the server persists events in batches
    stored = sorted(prefect_server.home.glob("prefect.db*"))
    places = [TRANSCRIPT, prefect_server.log_path, *stored]
    assert TRANSCRIPT.exists() and " runner[" in TRANSCRIPT.read_text()  # runners were heard
    assert stored and stored[0].stat().st_size > 100_000  # the server stored runs
    found = [line for path in places for line in leaks(path)]
    assert not found, "planted secrets came out:\n" + "\n".join(found[:20])
