"""az:// and abfs[s]:// URLs: Azure Blob Storage, through azure-storage-blob."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from runner.errors import (
    AccessDenied,
    StorageError,
    StorageNotFound,
    TransientStorageError,
    UnsupportedUrl,
)
from runner.storage import missing_sdk, redact
from runner.storage.base import ExistsBySize

CONNECTION_STRING = "AZURE_STORAGE_CONNECTION_STRING"
ACCOUNT_NAME = "AZURE_STORAGE_ACCOUNT_NAME"

# The SDK's default backs off 15 s, 18 s, 24 s before giving up; two retries a second
# apart absorb a blip, and longer backoff is the caller's job (it retries
# TransientStorageError).
_RETRIES = 2
_RETRY_BACKOFF = 1.0
_CONNECT_TIMEOUT = 10
_READ_TIMEOUT = 60

_DENIED_CODES = {"AuthenticationFailed", "AuthorizationFailure", "AuthorizationPermissionMismatch"}


@dataclass(frozen=True)
class Location:
    """Where an az:// or abfs[s]:// URL points."""

    scheme: str
    container: str
    key: str
    host: str | None  # account.dfs.core.windows.net for abfs[s]; None for az://

    @property
    def account(self) -> str | None:
        return self.host.split(".", 1)[0] if self.host else None

    @property
    def account_url(self) -> str | None:
        """The Blob endpoint of the account an abfs[s] URL names (its DFS host's sibling)."""
        if not self.host:
            return None
        account, _, rest = self.host.partition(".")
        suffix = rest.partition(".")[2]  # after "dfs." or "blob.": core.windows.net, ...
        return f"https://{account}.blob.{suffix}"

    def url(self, key: str) -> str:
        if self.host:
            return f"{self.scheme}://{self.container}@{self.host}/{key}"
        return f"az://{self.container}/{key}"


def parse(url: str) -> Location:
    """``az://container/key`` or ``abfs[s]://container@account.dfs.core.windows.net/key``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    key = parts.path.lstrip("/")
    if scheme == "az":
        if not parts.netloc:
            raise UnsupportedUrl(f"{redact(url)} names no container: write az://CONTAINER/PATH")
        return Location(scheme, parts.netloc, key, None)
    container, at, host = parts.netloc.rpartition("@")
    if not at or not container or host.count(".") < 2:
        raise UnsupportedUrl(
            f"{redact(url)} is not an ADLS URL: write "
            f"{scheme}://CONTAINER@ACCOUNT.dfs.core.windows.net/PATH"
        )
    return Location(scheme, container, key, host.lower())


def from_url(url: str, *, environ: Mapping[str, str] = os.environ) -> tuple[AzureBlobStorage, str]:
    """The container's backend and the blob's name. Credentials: the connection string
    in ``AZURE_STORAGE_CONNECTION_STRING`` when it is for the URL's account (az:// URLs
    take its account), else the account's Blob endpoint with DefaultAzureCredential
    (azure-identity, if installed); az:// then takes ``AZURE_STORAGE_ACCOUNT_NAME``."""
    location = parse(url)
    service = service_client(location, environ)
    return AzureBlobStorage(location, service=service), location.key


def service_client(location: Location, environ: Mapping[str, str]) -> Any:
    """A BlobServiceClient for the URL's account, from the environment's credentials."""
    try:
        from azure.storage.blob import BlobServiceClient, LinearRetry
    except ImportError as exc:
        raise missing_sdk(location.scheme, "azure-storage-blob", "azure") from exc

    options: dict[str, Any] = {
        "retry_policy": LinearRetry(
            backoff=_RETRY_BACKOFF, random_jitter_range=_RETRY_BACKOFF / 2, retry_total=_RETRIES
        ),
        "connection_timeout": _CONNECT_TIMEOUT,
        "read_timeout": _READ_TIMEOUT,
    }
    if connection_string := environ.get(CONNECTION_STRING):
        try:
            service = BlobServiceClient.from_connection_string(connection_string, **options)
        except ValueError as exc:
            # The SDK's message does not echo the string, but say only what is wrong.
            raise AccessDenied(
                f"{CONNECTION_STRING} is malformed: set it to the connection string from the "
                "storage account's Access keys"
            ) from exc
        if location.account in (None, service.account_name):
            return service
    account_url = location.account_url
    if account_url is None:
        if not (account := environ.get(ACCOUNT_NAME)):
            raise UnsupportedUrl(
                f"{location.url(location.key)} names no storage account: set "
                f"{CONNECTION_STRING} or {ACCOUNT_NAME}, or write "
                "abfss://CONTAINER@ACCOUNT.dfs.core.windows.net/PATH"
            )
        account_url = f"https://{account}.blob.core.windows.net"
    return BlobServiceClient(account_url, credential=_default_credential(), **options)


def _default_credential() -> Any:
    """DefaultAzureCredential (managed identity, workload identity, az login, env) when
    azure-identity is installed; without it, anonymous access (public containers)."""
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError:
        return None
    return DefaultAzureCredential()


class AzureBlobStorage(ExistsBySize):
    """One container. The service client is thread-safe; every call shares it."""

    def __init__(self, location: Location, *, service: Any) -> None:
        self.location = location
        self._container = service.get_container_client(location.container)
        self._anonymous = service.credential is None

    def url(self, key: str) -> str:
        return self.location.url(key)

    def size(self, key: str) -> int:
        with self._translated(key):
            return int(self._container.get_blob_client(key).get_blob_properties().size)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            with self._translated(key):
                downloader = self._container.get_blob_client(key).download_blob(
                    offset=start, length=length, max_concurrency=1
                )
                return downloader.readall()
        except StorageError as exc:
            if getattr(exc.__cause__, "status_code", None) == 416:
                return b""  # start is at or past the end of the blob
            raise

    def upload(self, path: Path, key: str) -> None:
        # upload_blob sends large files as blocks, several at a time.
        with self._translated(key), open(path, "rb") as data:
            self._container.get_blob_client(key).upload_blob(
                data, overwrite=True, max_concurrency=4
            )

    def list(self, prefix: str) -> list[str]:
        with self._translated(prefix):
            return sorted(self._container.list_blob_names(name_starts_with=prefix or None))

    @contextmanager
    def _translated(self, key: str) -> Iterator[None]:
        """Turn any azure-core error inside the block into a StorageError."""
        from azure.core.exceptions import AzureError

        try:
            yield
        except AzureError as exc:
            raise translate(exc, self.url(key), anonymous=self._anonymous) from exc


def translate(exc: BaseException, url: str, *, anonymous: bool = False) -> StorageError:
    """The StorageError for an azure-core error on ``url``."""
    from azure.core import exceptions as ax

    status = int(getattr(exc, "status_code", None) or 0)
    code = str(getattr(exc, "error_code", None) or status or type(exc).__name__)
    hint = (
        f"; no credential was used: set {CONNECTION_STRING}, or install azure-identity"
        if anonymous
        else ""
    )
    if isinstance(exc, ax.ClientAuthenticationError) or status in (401, 403):
        return AccessDenied(
            f"access denied to {url} ({code}): check the account key or the identity's "
            f"role on this container{hint}"
        )
    if code == "ContainerNotFound":
        return StorageNotFound(
            f"container of {url} does not exist: check the container and account names{hint}"
        )
    if isinstance(exc, ax.ResourceNotFoundError) or status == 404:
        return StorageNotFound(f"{url} does not exist ({code}): check the URL{hint}")
    if (
        isinstance(exc, (ax.ServiceRequestError, ax.ServiceResponseError, ax.IncompleteReadError))
        or status in (408, 429)
        or status >= 500
    ):
        return TransientStorageError(
            f"Azure Blob Storage unreachable or failing for {url} ({code}); worth retrying"
        )
    return StorageError(f"Azure Blob Storage request for {url} failed ({code})")
