"""The mask: which environment values are secrets, and that every path masks them."""

from __future__ import annotations

import io
import logging

import pytest

from runner import redaction


@pytest.fixture
def environ(monkeypatch):
    """Set variables, then have the mask read the environment again."""

    def set_(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        redaction.watch(None)

    yield set_
    monkeypatch.undo()
    redaction.watch(None)


def test_credential_variables_are_masked(environ):
    environ(PREFECT_API_KEY="pnu_abcdef123456", AWS_SECRET_ACCESS_KEY="wJalrXUtnFEMI/K7MDENG")
    line = "key pnu_abcdef123456 and wJalrXUtnFEMI/K7MDENG in one line"
    assert redaction.mask(line) == "key *** and *** in one line"


def test_secret_env_names_more_variables(environ, monkeypatch):
    monkeypatch.delenv("RUNNER_SECRET_ENV", raising=False)
    environ(DB_PASSWORD="hunter2hunter2", GITHUB_TOKEN="ghp_0123456789")
    assert redaction.mask("hunter2hunter2") == "hunter2hunter2"  # not named yet
    redaction.watch("DB_PASSWORD, GITHUB_TOKEN")
    assert redaction.mask("db=hunter2hunter2 gh=ghp_0123456789") == "db=*** gh=***"
    # Children read the names from the environment.
    assert redaction.secret_names({"RUNNER_SECRET_ENV": "DB_PASSWORD GITHUB_TOKEN"}) == [
        "DB_PASSWORD",
        "GITHUB_TOKEN",
    ]
    import os

    assert os.environ["RUNNER_SECRET_ENV"] == "DB_PASSWORD GITHUB_TOKEN"


def test_index_url_password_and_connection_string_parts(environ):
    environ(
        RUNNER_INDEX_URL="https://alice:s3cr%21t-pw@pypi.example.com/simple",
        UV_INDEX_INTERNAL_PASSWORD="p4ssw0rd-index",
        AZURE_STORAGE_CONNECTION_STRING=(
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=Zm9vYmFyYmF6cXV4==;"
            "EndpointSuffix=core.windows.net"
        ),
    )
    assert redaction.mask("pw s3cr!t-pw / s3cr%21t-pw") == "pw *** / ***"
    assert redaction.mask("https://alice:s3cr%21t-pw@pypi") == "https://***@pypi"
    assert redaction.mask("p4ssw0rd-index") == "***"
    assert redaction.mask("the key Zm9vYmFyYmF6cXV4== alone") == "the key *** alone"


def test_short_values_are_not_masked(environ):
    environ(AWS_SESSION_TOKEN="abc")
    assert redaction.mask("abc abc") == "abc abc"


def test_scrub_masks_every_string_of_an_event(environ):
    environ(PREFECT_API_KEY="pnu_event_secret")
    event = {"payload": {"note": "x pnu_event_secret", "n": 3, "list": ["pnu_event_secret"]}}
    assert redaction.scrub(event) == {"payload": {"note": "x ***", "n": 3, "list": ["***"]}}


def test_filter_masks_arguments_and_tracebacks(environ):
    environ(PREFECT_API_KEY="pnu_filter_secret")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(redaction.MaskFilter())
    logger = logging.getLogger("test-redaction")
    logger.addHandler(handler)
    try:
        logger.error("using %s", "pnu_filter_secret")
        try:
            raise ValueError("bad key pnu_filter_secret")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "pnu_filter_secret" not in text
    assert "using ***" in text and "ValueError: bad key ***" in text


def test_mask_all_handlers_covers_handlers_configured_elsewhere(environ):
    environ(PREFECT_API_KEY="pnu_handler_secret")
    stream = io.StringIO()
    logger = logging.getLogger("test-redaction.elsewhere")
    logger.addHandler(logging.StreamHandler(stream))
    try:
        redaction.mask_all_handlers()
        redaction.mask_all_handlers()  # once is enough; twice adds nothing
        assert sum(isinstance(f, redaction.MaskFilter) for f in logger.handlers[0].filters) == 1
        logger.warning("pnu_handler_secret")
    finally:
        logger.handlers.clear()
    assert stream.getvalue() == "***\n"
