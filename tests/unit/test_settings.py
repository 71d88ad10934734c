"""Settings: precedence, aliases, validation errors as one ConfigError line."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from runner.errors import ConfigError
from runner.settings import Settings, load_settings


def test_cli_value_beats_environment(monkeypatch):
    monkeypatch.setenv("RUNNER_API_WAIT", "5")
    assert load_settings().api_wait == 5
    assert load_settings(api_wait="7").api_wait == 7


def test_flow_run_id_from_prefect_worker_variable(monkeypatch):
    run_id = str(uuid.uuid4())
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", run_id)
    assert load_settings().run_id() == uuid.UUID(run_id)


def test_runner_variable_beats_prefect_worker_variable(monkeypatch):
    ours, theirs = str(uuid.uuid4()), str(uuid.uuid4())
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", theirs)
    monkeypatch.setenv("RUNNER_FLOW_RUN_ID", ours)
    assert load_settings().flow_run_id == ours


def test_settings_are_frozen():
    with pytest.raises(ValidationError):
        Settings().api_wait = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"on_exit": "explode"}, "on_exit"),
        ({"api_wait": "-1"}, "api_wait"),
        ({"on_exit": "command"}, "--on-exit-command"),
    ],
)
def test_bad_settings_are_one_config_error(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_settings(**overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_missing_and_malformed_flow_run_id():
    with pytest.raises(ConfigError, match="no flow run id"):
        Settings().run_id()
    with pytest.raises(ConfigError, match="is not a UUID"):
        Settings(flow_run_id="abc").run_id()
