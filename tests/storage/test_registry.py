"""The scheme registry: which backend a URL gets, keys, join, redaction, lazy SDK imports
and the install command a missing SDK names. No server needed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runner.errors import UnsupportedUrl
from runner.storage import join, redact, resolve

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Enough configuration for every SDK to build a client without the network."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        "DefaultEndpointsProtocol=http;AccountName=acct;AccountKey=a2V5;"
        "BlobEndpoint=http://127.0.0.1:9/acct;",
    )


@pytest.mark.parametrize(
    ("url", "backend", "key"),
    [
        ("s3://bucket/flows/abc.tar.gz", "S3Storage", "flows/abc.tar.gz"),
        ("s3://bucket/flows/abc.tar.gz#sha256=00", "S3Storage", "flows/abc.tar.gz"),
        ("gs://bucket/a/b", "GCSStorage", "a/b"),
        ("az://container/a/b", "AzureBlobStorage", "a/b"),
        ("abfs://container@acct.dfs.core.windows.net/a/b", "AzureBlobStorage", "a/b"),
        ("abfss://container@acct.dfs.core.windows.net/a/b", "AzureBlobStorage", "a/b"),
        ("https://host/a/b?X-Amz-Signature=s", "HttpStorage", "https://host/a/b?X-Amz-Signature=s"),
        ("http://127.0.0.1:9/a", "HttpStorage", "http://127.0.0.1:9/a"),
        ("file:///tmp/a%20b/c", "LocalStorage", "tmp/a b/c"),
        ("file://localhost/tmp/c", "LocalStorage", "tmp/c"),
        ("/tmp/a#b?c", "LocalStorage", "tmp/a#b?c"),
        ("S3://bucket/k", "S3Storage", "k"),
    ],
)
def test_resolve_picks_the_backend_by_scheme(
    url: str, backend: str, key: str, offline_env: None
) -> None:
    storage, got = resolve(url)
    assert type(storage).__name__ == backend
    assert got == key


def test_relative_paths_are_taken_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    storage, key = resolve("bundles/x.tar.gz")
    assert key == str(tmp_path / "bundles" / "x.tar.gz").lstrip("/")
    assert storage.url(key) == (tmp_path / "bundles" / "x.tar.gz").as_uri()


def test_unknown_scheme_names_the_supported_ones() -> None:
    with pytest.raises(UnsupportedUrl) as caught:
        resolve("ftp://user:secret@host/x.tar.gz")
    message = str(caught.value)
    assert "'ftp://'" in message
    for scheme in ["s3://", "gs://", "az://", "abfss://", "https://", "file://", "local paths"]:
        assert scheme in message
    assert "secret" not in message and "\n" not in message


@pytest.mark.parametrize("url", ["s3:///key", "gs://", "az:///x", "abfss://acct.dfs.x/p"])
def test_url_without_a_bucket_is_refused(url: str, offline_env: None) -> None:
    with pytest.raises(UnsupportedUrl):
        resolve(url)


def test_az_url_without_an_account_says_how_to_name_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_NAME", raising=False)
    with pytest.raises(UnsupportedUrl, match="AZURE_STORAGE_ACCOUNT_NAME"):
        resolve("az://container/key")


def test_file_url_for_another_host_is_refused() -> None:
    with pytest.raises(UnsupportedUrl, match="remote host"):
        resolve("file://server/share/x")


@pytest.mark.parametrize(
    ("url", "joined"),
    [
        ("s3://bucket/flows", "s3://bucket/flows/n.tar.gz"),
        ("s3://bucket/flows/", "s3://bucket/flows/n.tar.gz"),
        ("s3://bucket", "s3://bucket/n.tar.gz"),
        ("https://h/c/flows?sv=1&sig=abc", "https://h/c/flows/n.tar.gz?sv=1&sig=abc"),
        ("https://h/c?sig=abc#frag", "https://h/c/n.tar.gz?sig=abc#frag"),
        ("file:///tmp/d", "file:///tmp/d/n.tar.gz"),
        ("/tmp/d", "/tmp/d/n.tar.gz"),
        ("/tmp/d#1/", "/tmp/d#1/n.tar.gz"),
        ("/", "/n.tar.gz"),
        ("rel/dir", "rel/dir/n.tar.gz"),
        ("", "n.tar.gz"),
    ],
)
def test_join_appends_one_component(url: str, joined: str) -> None:
    assert join(url, "n.tar.gz") == joined


@pytest.mark.parametrize("name", ["", "a/b", "..", "."])
def test_join_takes_exactly_one_component(name: str) -> None:
    with pytest.raises(ValueError):
        join("s3://b/p", name)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://h/p/x?X-Amz-Signature=abc&X-Amz-Credential=AKIA", "https://h/p/x"),
        ("https://user:pw@h:8443/x", "https://***@h:8443/x"),
        ("abfss://c@acct.dfs.core.windows.net/x?sig=1", "abfss://c@acct.dfs.core.windows.net/x"),
        ("s3://b/k#sha256=00", "s3://b/k"),
        ("/tmp/a?b", "/tmp/a?b"),
    ],
)
def test_redact_drops_credentials_and_signatures(url: str, shown: str) -> None:
    assert redact(url) == shown


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_backends_and_sdks_are_imported_only_when_used(tmp_path: Path) -> None:
    result = run_python(
        f"""
        import sys
        from runner.storage import resolve
        storage, key = resolve({str(tmp_path / "x")!r})
        resolve("https://127.0.0.1:9/x")
        heavy = ["boto3", "botocore", "google.cloud.storage", "azure.storage.blob",
                 "runner.storage.s3", "runner.storage.gcs", "runner.storage.azure"]
        print([name for name in heavy if name in sys.modules])
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("url", "blocked", "extra"),
    [
        ("s3://bucket/key", "boto3", "s3"),
        ("gs://bucket/key", "google.cloud.storage", "gcs"),
        ("az://container/key", "azure.storage.blob", "azure"),
        ("abfss://container@acct.dfs.core.windows.net/key", "azure.storage.blob", "azure"),
    ],
)
def test_missing_sdk_names_the_install_command(url: str, blocked: str, extra: str) -> None:
    # The SDK is made unimportable in a fresh interpreter, as if it were not installed.
    result = run_python(
        f"""
        import sys
        sys.modules[{blocked!r}] = None
        from runner.errors import MissingDependency
        from runner.storage import resolve
        try:
            resolve({url!r})
        except MissingDependency as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.endswith(f"pip install 'prefect-vm-runner[{extra}]'"), line
    assert "\n" not in line
