"""Garbage in the VM's user-data file: one line naming the file and the line, exit 2, one
teardown, and the run the file names ends Crashed (its API URL from the file's good lines)."""

from __future__ import annotations

import pytest

CASES = {
    # case: (the file's third line, what the error line says of it)
    "malformed line": (b"this line is not a variable\n", "line 3: not a KEY=VALUE line"),
    "unknown key": (
        b"RUNNER_HEARTBEAT_SECOND=5\n",
        "line 3: unknown setting RUNNER_HEARTBEAT_SECOND",
    ),
    "invalid value": (b"RUNNER_MAX_RUNTIME=soon\n", "line 3: RUNNER_MAX_RUNTIME: Input should be"),
    "non-utf-8 byte": (b"RUNNER_WORKDIR=/var/lib/caf\xe9\n", "line 3: byte 0xe9 is not UTF-8"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_garbage_user_data_is_exit_2_naming_the_line_and_crashes_the_run(
    case, runner, flow_run, client, prefect_server, tmp_path
):
    third_line, says = CASES[case]
    run = flow_run("hello", n=1)
    user_data = tmp_path / "user-data.env"
    user_data.write_bytes(
        f"RUNNER_FLOW_RUN_ID={run.id}\n".encode()
        + f"PREFECT_API_URL={prefect_server.api_url}\n".encode()
        + third_line
        + b"# the end\n"
    )

    # The API URL comes from the file alone, as on a VM.
    result = runner.run("--user-data-file", str(user_data), PREFECT_API_URL="")

    result.assert_one_error(2, f"user-data file {user_data}, {says}")
    state = client.read_flow_run(run.id).state
    assert state.is_crashed(), state
    assert "user-data cannot be used" in state.message and says in state.message
    assert runner.written_outside_workdir() == []


def test_garbage_user_data_that_names_no_run_is_exit_2_at_the_claim_deadline(runner, tmp_path):
    user_data = tmp_path / "user-data.env"
    user_data.write_text("# written by cloud-init\nnot a variable at all\n")

    result = runner.run("--user-data-file", str(user_data), "--claim-timeout", "1")

    result.assert_one_error(2, f"user-data file {user_data}, line 2: not a KEY=VALUE line")
    assert runner.written_outside_workdir() == []


def test_a_run_already_running_elsewhere_is_left_alone(runner, flow_run, client, tmp_path):
    """A second VM given the same run with bad user-data must not crash the first one's."""
    from prefect.states import Running

    run = flow_run("hello", n=1)
    client.set_flow_run_state(run.id, Running(), force=True)
    user_data = tmp_path / "user-data.env"
    user_data.write_text(f"RUNNER_FLOW_RUN_ID={run.id}\nRUNNER_MAX_RUNTIME=soon\n")

    result = runner.run("--user-data-file", str(user_data))

    result.assert_one_error(2, "line 2: RUNNER_MAX_RUNTIME: Input should be")
    assert client.read_flow_run(run.id).state.is_running()
