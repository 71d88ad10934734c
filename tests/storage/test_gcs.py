"""Cloud Storage specifics: no credentials, an unreachable endpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.server_process import free_port
from runner.errors import AccessDenied, TransientStorageError
from runner.storage import resolve
from tests.storage.conftest import use_env


def test_no_credentials_is_access_denied(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A credentials file that is not there: google.auth gives up at once, without
    # probing the metadata server (off limits to tests).
    use_env(monkeypatch, {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "missing.json")})
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    with pytest.raises(AccessDenied, match="no Google Cloud credentials") as caught:
        resolve("gs://bucket/x")
    assert "gs://bucket/" in str(caught.value)


def test_unreachable_endpoint_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(monkeypatch, {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{free_port()}"})
    storage, key = resolve("gs://bucket/x")
    with pytest.raises(TransientStorageError, match="gs://bucket/x"):
        storage.read_range(key, 0, 10)
