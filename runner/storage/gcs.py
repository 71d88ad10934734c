"""gs:// URLs: Google Cloud Storage, through google-cloud-storage."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runner.errors import AccessDenied, StorageError, StorageNotFound, TransientStorageError
from runner.storage import bucket_and_key, missing_sdk
from runner.storage.base import ExistsBySize

# The SDK's default retry keeps trying for two minutes; a few seconds absorbs a blip,
# and longer backoff is the caller's job (it retries TransientStorageError).
_RETRY_SECONDS = 5.0
_TIMEOUT = (10, 60)  # (connect, read) seconds per request


def from_url(url: str) -> tuple[GCSStorage, str]:
    """``gs://bucket/key`` -> (the bucket's backend, ``key``)."""
    bucket, key = bucket_and_key(url)
    return GCSStorage(bucket), key


class GCSStorage(ExistsBySize):
    """One bucket. Credentials come from google.auth's default chain (service account,
    workload identity, ``gcloud auth application-default login``); with
    ``STORAGE_EMULATOR_HOST`` set the SDK talks to that emulator, anonymously."""

    def __init__(self, bucket: str, *, client: Any | None = None) -> None:
        self.name = bucket
        # One client (one HTTP session) per backend, shared by the reading threads;
        # Blob objects carry per-call state, so each call makes its own.
        self._client = client if client is not None else self._default_client()
        self._bucket = self._client.bucket(bucket)
        self._retry = _retry()

    def url(self, key: str) -> str:
        return f"gs://{self.name}/{key}"

    def size(self, key: str) -> int:
        blob = self._bucket.blob(key)
        try:
            with self._translated(key):
                blob.reload(retry=self._retry, timeout=_TIMEOUT)
        except StorageNotFound:
            self._check_bucket(key)  # a 404 on an object does not say which is missing
            raise
        return int(blob.size or 0)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            with self._translated(key):
                # raw_download: the stored bytes, even for objects with
                # Content-Encoding: gzip (no decompressive transcoding); no checksum,
                # since one covers the whole object, not a range.
                return self._bucket.blob(key).download_as_bytes(
                    start=start,
                    end=start + length - 1,
                    raw_download=True,
                    checksum=None,
                    retry=self._retry,
                    timeout=_TIMEOUT,
                )
        except StorageError as exc:
            if _status(exc.__cause__) == 416:
                return b""  # start is at or past the end of the object
            raise

    def upload(self, path: Path, key: str) -> None:
        # Files over the SDK's threshold go up as a resumable upload, in chunks.
        with self._translated(key):
            self._bucket.blob(key).upload_from_filename(
                str(path), retry=self._retry, timeout=_TIMEOUT
            )

    def list(self, prefix: str) -> list[str]:
        with self._translated(prefix):
            blobs = self._client.list_blobs(
                self.name, prefix=prefix, retry=self._retry, timeout=_TIMEOUT
            )
            return sorted(blob.name for blob in blobs)

    def _check_bucket(self, key: str) -> None:
        """Raise StorageNotFound naming the bucket if it is the bucket that is missing."""
        try:
            with self._translated(key):
                exists = self._bucket.exists(retry=self._retry, timeout=_TIMEOUT)
        except StorageError:
            return  # e.g. no storage.buckets.get permission: the object's not-found stands
        if not exists:
            raise StorageNotFound(
                f"bucket gs://{self.name} does not exist (looking for {self.url(key)}): "
                "check the bucket name and project"
            )

    def _default_client(self) -> Any:
        try:
            from google.cloud import storage
        except ImportError as exc:
            raise missing_sdk("gs", "google-cloud-storage", "gcs") from exc
        with self._translated(""):
            # project=None: object operations need no project, so none has to be configured.
            return storage.Client(project=None)

    @contextmanager
    def _translated(self, key: str) -> Iterator[None]:
        """Turn any google-cloud / google-auth / requests error in the block into a
        StorageError."""
        from google.api_core.exceptions import GoogleAPIError
        from google.auth.exceptions import GoogleAuthError
        from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
        from requests.exceptions import RequestException

        try:
            yield
        except (
            GoogleAPIError,
            GoogleAuthError,
            RequestException,
            InvalidResponse,
            DataCorruption,
        ) as exc:
            cause = _unwrap(exc)
            raise translate(cause, self.url(key)) from cause


def _retry() -> Any:
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_delay(initial=0.25, maximum=2.0, multiplier=2.0).with_timeout(
        _RETRY_SECONDS
    )


def translate(exc: BaseException, url: str) -> StorageError:
    """The StorageError for a google-cloud-storage error on ``url``."""
    from google.api_core import exceptions as gx
    from google.auth import exceptions as ax
    from google.cloud.storage.exceptions import DataCorruption
    from requests import exceptions as rx

    status = _status(exc)
    if isinstance(exc, ax.DefaultCredentialsError):
        return AccessDenied(
            f"no Google Cloud credentials for {url}: attach a service account to the VM, set "
            "GOOGLE_APPLICATION_CREDENTIALS, or run `gcloud auth application-default login`"
        )
    if isinstance(exc, (ax.RefreshError, gx.Unauthorized, gx.Forbidden)) or status in (401, 403):
        return AccessDenied(
            f"access denied to {url} ({status or type(exc).__name__}): check that the "
            "credentials google.auth finds are valid and allowed on this bucket"
        )
    if isinstance(exc, gx.NotFound) or status == 404:
        return StorageNotFound(f"{url} does not exist (no such object): check the URL")
    transient = (
        gx.ServerError,
        gx.TooManyRequests,
        gx.RetryError,
        DataCorruption,
        ax.TransportError,
        rx.ConnectionError,
        rx.Timeout,
        rx.ChunkedEncodingError,
    )
    if isinstance(exc, transient) or status == 429 or status >= 500:
        return TransientStorageError(
            f"Cloud Storage unreachable or failing for {url} ({status or type(exc).__name__}); "
            "worth retrying"
        )
    return StorageError(f"Cloud Storage request for {url} failed ({status or type(exc).__name__})")


def _unwrap(exc: BaseException) -> BaseException:
    """The last attempt's error behind a RetryError (its own text says only 'timeout')."""
    from google.api_core.exceptions import RetryError

    if isinstance(exc, RetryError) and isinstance(exc.cause, BaseException):
        return exc.cause
    return exc


def _status(exc: BaseException | None) -> int:
    code = getattr(exc, "code", None)  # google.api_core errors
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)  # InvalidResponse, requests errors
    return int(getattr(response, "status_code", 0) or 0)
