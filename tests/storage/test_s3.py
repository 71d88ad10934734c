"""S3 specifics on moto: refused credentials, no credentials, an unreachable endpoint,
path-style addressing."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.server_process import free_port
from devtools.storage_servers import MotoServer
from runner.errors import AccessDenied, TransientStorageError
from runner.storage import resolve
from tests.storage.conftest import BUCKET, use_env
from tests.storage.denied import assert_every_call_denied

SECRET = "wJalrXUtnFEMI-not-a-real-secret"


def test_unknown_credentials_are_access_denied(
    moto_iam: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_env(monkeypatch, {**moto_iam.env(), "AWS_SECRET_ACCESS_KEY": SECRET})
    storage, key = resolve(f"s3://{BUCKET}/flows/x.tar.gz")
    assert_every_call_denied(
        storage, key, tmp_path, names=f"s3://{BUCKET}/", secrets=(SECRET, "testing")
    )


def test_no_credentials_at_all_is_access_denied(
    moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_env(monkeypatch, {"AWS_ENDPOINT_URL": moto.url, "AWS_DEFAULT_REGION": "us-east-1"})
    for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]:
        monkeypatch.delenv(name, raising=False)
    # Nothing else in the chain either: no files, and no instance metadata service
    # (its link-local address is off limits to tests).
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    monkeypatch.delenv("AWS_WEB_IDENTITY_TOKEN_FILE", raising=False)

    storage, key = resolve(f"s3://{BUCKET}/x")
    with pytest.raises(AccessDenied, match="no usable AWS credentials"):
        storage.size(key)


def test_unreachable_endpoint_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(
        monkeypatch,
        {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        },
    )
    storage, key = resolve("s3://bucket/x")
    with pytest.raises(TransientStorageError, match="s3://bucket/x"):
        storage.read_range(key, 0, 10)


def test_path_style_addressing_with_an_endpoint_url(
    s3_env: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner.storage.s3 import default_client

    assert default_client().meta.config.s3["addressing_style"] == "path"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    client = default_client()  # real AWS: no request is made here
    assert client.meta.config.s3["addressing_style"] == "auto"
    assert client.meta.endpoint_url.endswith(".amazonaws.com")
