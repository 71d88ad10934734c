"""Settings: precedence, aliases, validation errors as one ConfigError line."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from runner.errors import ConfigError
from runner.settings import Settings, load_settings
from runner.vm.clouds import CLOUDS
from tests.helpers import run_cli


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


def test_cloud_accepts_auto_none_and_each_registered_cloud():
    for name in ("auto", *CLOUDS, "none"):
        assert load_settings(cloud=name).cloud == name


def test_unknown_cloud_is_refused_naming_the_valid_choices(monkeypatch, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_settings(cloud="oci")
    message = str(err.value)
    assert "unknown cloud 'oci'" in message and "\n" not in message
    assert "choose one of auto, aws, gcp, azure, none" in message

    monkeypatch.setenv("RUNNER_CLOUD", "oci")
    with pytest.raises(ConfigError, match="unknown cloud 'oci'"):
        load_settings()

    monkeypatch.delenv("RUNNER_CLOUD")
    out = run_cli("--cloud", "oci", "--workdir", str(tmp_path), timeout=60)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "unknown cloud 'oci'; choose one of auto, aws, gcp, azure, none" in line


def test_metadata_urls_are_each_clouds_own_by_default(monkeypatch):
    monkeypatch.delenv("RUNNER_METADATA_URL", raising=False)
    assert load_settings().metadata_urls() == {
        "aws": "http://169.254.169.254",
        "gcp": "http://metadata.google.internal",
        "azure": "http://169.254.169.254",
    }


def test_metadata_url_overrides_every_clouds_base_url(monkeypatch):
    expected = dict.fromkeys(CLOUDS, "http://127.0.0.1:8081")
    settings = load_settings(metadata_url="http://127.0.0.1:8081/")
    assert settings.metadata_urls() == expected
    assert settings.as_environment()["RUNNER_METADATA_URL"] == "http://127.0.0.1:8081/"

    monkeypatch.setenv("RUNNER_METADATA_URL", "http://127.0.0.1:8081")
    assert load_settings().metadata_urls() == expected
