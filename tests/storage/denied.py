"""A check shared by the per-backend access-denied tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.errors import AccessDenied
from runner.storage.base import Storage


def assert_every_call_denied(
    storage: Storage, key: str, tmp_path: Path, *, names: str, secrets: tuple[str, ...]
) -> None:
    """Every operation raises AccessDenied naming the bucket (``names``), not a secret."""
    source = tmp_path / "x"
    source.write_bytes(b"x")
    calls = {
        "size": lambda: storage.size(key),
        "exists": lambda: storage.exists(key),
        "read_range": lambda: storage.read_range(key, 0, 10),
        "upload": lambda: storage.upload(source, key),
        "list": lambda: storage.list("flows/"),
    }
    for name, call in calls.items():
        with pytest.raises(AccessDenied) as caught:
            call()
        message = str(caught.value)
        assert names in message, name
        assert not any(secret in message for secret in secrets), name
