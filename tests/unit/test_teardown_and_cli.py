"""Teardown runs once; the CLI turns errors into the documented exit codes."""

from __future__ import annotations

import logging
import os
import subprocess

from runner.errors import ExitCode, exit_code_for_state
from runner.settings import Settings
from runner.vm.teardown import Teardown
from tests.helpers import run_cli


def test_teardown_command_runs_exactly_once(tmp_path):
    log = tmp_path / "teardown.log"
    settings = Settings(
        flow_run_id="x",
        on_exit="command",
        on_exit_command=f'echo "$RUNNER_EXIT_CODE $RUNNER_FLOW_RUN_ID" >> {log}',
    )
    teardown = Teardown(settings)
    teardown(exit_code=3)
    teardown(exit_code=0)
    assert log.read_text().splitlines() == ["3 x"]


def test_teardown_none_neither_powers_off_nor_runs_the_command(tmp_path, monkeypatch, caplog):
    """Stand-ins for poweroff's commands on PATH, and an exit command: none may run."""
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("systemctl", "shutdown"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n')
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    settings = Settings(on_exit="none", on_exit_command=f"echo command >> {calls}")

    with caplog.at_level(logging.INFO, logger="runner"):
        Teardown(settings)(exit_code=0)

    assert not calls.exists()
    assert "teardown: on-exit=none (exit code 0)" in caplog.text


def test_exit_codes_for_final_states():
    assert exit_code_for_state("COMPLETED") is ExitCode.COMPLETED
    assert exit_code_for_state("FAILED") is ExitCode.FLOW_FAILED
    assert exit_code_for_state("CANCELLED") is ExitCode.FLOW_FAILED
    assert exit_code_for_state("CRASHED") is ExitCode.CRASHED


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=60)


def test_help_lists_every_setting_and_the_exit_codes():
    out = _cli("--help")
    assert out.returncode == 0
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out.stdout
        assert "RUNNER_" + name.upper() in out.stdout
    for code in ExitCode:
        assert f"  {int(code)}  " in out.stdout


def test_bad_setting_is_exit_2_with_one_line(tmp_path):
    out = _cli("--on-exit", "command", "--workdir", str(tmp_path))
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert "--on-exit-command" in out.stderr
