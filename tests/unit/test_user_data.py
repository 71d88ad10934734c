"""Reading the user-data file: its variables, the line each came from, its first problem."""

from __future__ import annotations

import pytest

from runner.vm.user_data import read


def test_variables_and_their_lines_past_comments_and_blank_lines(tmp_path):
    path = tmp_path / "user-data.env"
    path.write_text(
        "# written by cloud-init\n\nRUNNER_FLOW_RUN_ID=abc\n\n\n"
        "export PREFECT_API_URL='http://127.0.0.1:4200/api'\nRUNNER_ON_EXIT=\"poweroff\"\n"
    )

    data = read(path)

    assert data.problem is None
    assert data.values == {
        "RUNNER_FLOW_RUN_ID": "abc",
        "PREFECT_API_URL": "http://127.0.0.1:4200/api",
        "RUNNER_ON_EXIT": "poweroff",
    }
    assert data.lines == {"RUNNER_FLOW_RUN_ID": 3, "PREFECT_API_URL": 6, "RUNNER_ON_EXIT": 7}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b"A=1\n\n# c\nnot a variable\n", "line 4: not a KEY=VALUE line"),
        (b"A=1\nRUNNER_ON_EXIT\n", "line 2: not a KEY=VALUE line"),  # a bare (truncated) word
        (b"runner_heartbeat_second=5\n", "line 1: unknown setting runner_heartbeat_second"),
        (b"RUNNER_FLOW_RUN_ID=x\nRUNNER_NOPE=1\n", "line 2: unknown setting RUNNER_NOPE"),
        (b"A=1\nB=caf\xe9\n", "line 2: byte 0xe9 is not UTF-8"),
        # The first problem is the one reported.
        (b"RUNNER_X=1\ngarbage\n", "line 1: unknown setting RUNNER_X"),
    ],
)
def test_the_first_problem_names_its_line_never_its_value(tmp_path, text, problem):
    path = tmp_path / "user-data.env"
    path.write_bytes(text)

    data = read(path)

    assert data.problem.startswith(f"user-data file {path}, {problem}")
    assert "caf" not in data.problem and "=1" not in data.problem


def test_the_good_lines_still_name_the_run(tmp_path):
    path = tmp_path / "user-data.env"
    path.write_bytes(b"RUNNER_FLOW_RUN_ID=abc\n\xff\xfe\n")

    data = read(path)

    assert data.problem is not None and data.names_a_run()


def test_a_file_not_written_yet_is_empty(tmp_path):
    data = read(tmp_path / "later.env")
    assert (data.values, data.problem) == ({}, None)
