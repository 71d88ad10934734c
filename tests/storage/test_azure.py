"""Azure specifics on Azurite: a wrong account key, an unreachable endpoint, which
credentials a URL gets."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from devtools.server_process import free_port
from devtools.storage_servers import AZURITE_ACCOUNT, Azurite
from runner.errors import AccessDenied, TransientStorageError
from runner.storage import resolve
from runner.storage.azure import parse, service_client
from tests.storage.conftest import BUCKET, use_env
from tests.storage.denied import assert_every_call_denied

WRONG_KEY = base64.b64encode(
    b"a key Azurite does not know, 64 bytes long....................."
).decode()


def test_wrong_account_key_is_access_denied(
    azurite: Azurite, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    connection_string = azurite.connection_string(account_key=WRONG_KEY)
    use_env(monkeypatch, {"AZURE_STORAGE_CONNECTION_STRING": connection_string})
    storage, key = resolve(f"az://{BUCKET}/flows/x.tar.gz")
    assert_every_call_denied(
        storage, key, tmp_path, names=f"az://{BUCKET}/", secrets=(WRONG_KEY, "AccountKey")
    )


def test_unreachable_endpoint_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    nothing_there = f"http://127.0.0.1:{free_port()}/{AZURITE_ACCOUNT}"
    use_env(
        monkeypatch,
        {
            "AZURE_STORAGE_CONNECTION_STRING": f"DefaultEndpointsProtocol=http;"
            f"AccountName={AZURITE_ACCOUNT};AccountKey={WRONG_KEY};BlobEndpoint={nothing_there};"
        },
    )
    storage, key = resolve("az://container/x")
    with pytest.raises(TransientStorageError, match="az://container/x"):
        storage.read_range(key, 0, 10)


def test_malformed_connection_string_is_access_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(monkeypatch, {"AZURE_STORAGE_CONNECTION_STRING": "AccountKey=s3cr3t;nonsense"})
    with pytest.raises(AccessDenied, match="malformed") as caught:
        resolve("az://container/x")
    assert "s3cr3t" not in str(caught.value)


def test_abfs_url_names_the_blob_endpoint_of_its_account() -> None:
    location = parse("abfss://flows@myacct.dfs.core.windows.net/a/b.tar.gz")
    assert (location.container, location.key, location.account) == ("flows", "a/b.tar.gz", "myacct")
    assert location.account_url == "https://myacct.blob.core.windows.net"
    assert location.url("c") == "abfss://flows@myacct.dfs.core.windows.net/c"


def test_connection_string_is_used_only_for_its_own_account(azurite: Azurite) -> None:
    env = azurite.env()
    ours = service_client(parse(f"abfs://c@{AZURITE_ACCOUNT}.dfs.core.windows.net/k"), env)
    assert ours.url.startswith(azurite.url)
    other = service_client(parse("abfs://c@otheracct.dfs.core.windows.net/k"), env)
    assert other.url.startswith("https://otheracct.blob.core.windows.net")


def test_az_url_takes_the_account_name_without_a_connection_string() -> None:
    service = service_client(parse("az://c/k"), {"AZURE_STORAGE_ACCOUNT_NAME": "someacct"})
    assert service.url.startswith("https://someacct.blob.core.windows.net")
