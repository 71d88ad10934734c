"""The README documents every setting and every exit code the code has."""

from __future__ import annotations

from pathlib import Path

from runner.errors import ExitCode
from runner.settings import Settings, env_var

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented():
    for name in Settings.model_fields:
        assert f"`--{name.replace('_', '-')}`" in README, name
        assert f"`{env_var(name)}`" in README, name


def test_every_exit_code_is_documented():
    for code in ExitCode:
        assert f"\n| {int(code)} |" in README, code
