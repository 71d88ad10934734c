"""s3:// URLs: Amazon S3 and S3-compatible endpoints, through boto3."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from runner.errors import AccessDenied, StorageError, StorageNotFound, TransientStorageError
from runner.storage import bucket_and_key, missing_sdk
from runner.storage.base import ExistsBySize

# A few quick attempts inside boto3 absorb a blip; longer backoff is the caller's job
# (it retries TransientStorageError), so the two do not multiply into minutes.
_MAX_ATTEMPTS = 3
_CONNECT_TIMEOUT = 10
_READ_TIMEOUT = 60

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED_CODES = {
    "401",
    "403",
    "AccessDenied",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
}
_TRANSIENT_CODES = {
    "InternalError",
    "RequestTimeout",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
}
_RANGE_NOT_SATISFIABLE = {"416", "InvalidRange"}


def from_url(url: str) -> tuple[S3Storage, str]:
    """``s3://bucket/key`` -> (the bucket's backend, ``key``)."""
    bucket, key = bucket_and_key(url)
    return S3Storage(bucket), key


class S3Storage(ExistsBySize):
    """One bucket. Credentials, region and endpoint (``AWS_ENDPOINT_URL``) come from
    boto3's default chain; the client is thread-safe, so one serves every thread."""

    def __init__(self, bucket: str, *, client: Any | None = None) -> None:
        self.bucket = bucket
        self._client = client if client is not None else default_client()

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def size(self, key: str) -> int:
        try:
            with self._translated(key):
                return int(self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except StorageNotFound:
            # A HEAD answer has no body, so 404 does not say whether the bucket exists.
            self._check_bucket(key)
            raise

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        byte_range = f"bytes={start}-{start + length - 1}"
        try:
            with self._translated(key):
                response = self._client.get_object(Bucket=self.bucket, Key=key, Range=byte_range)
                return response["Body"].read()
        except StorageError as exc:
            if _code(exc.__cause__) in _RANGE_NOT_SATISFIABLE:
                return b""  # start is at or past the end of the object
            raise

    def upload(self, path: Path, key: str) -> None:
        # upload_file switches to a multipart upload, parts in parallel, for large files.
        with self._translated(key):
            self._client.upload_file(str(path), self.bucket, key)

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        with self._translated(prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def _check_bucket(self, key: str) -> None:
        """Raise StorageNotFound naming the bucket if it is the bucket that is missing."""
        try:
            with self._translated(key):
                self._client.head_bucket(Bucket=self.bucket)
        except StorageNotFound as exc:
            raise StorageNotFound(
                f"bucket s3://{self.bucket} does not exist (looking for {self.url(key)}): "
                "check the bucket name, and the endpoint and region boto3 uses"
            ) from exc.__cause__
        except StorageError:
            pass  # e.g. no s3:ListBucket: the object's own not-found stands

    @contextmanager
    def _translated(self, key: str) -> Iterator[None]:
        """Turn any boto3/botocore error inside the block into a StorageError."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            raise translate(exc, self.url(key)) from _root_cause(exc)


def default_client() -> Any:
    """An S3 client from boto3's default chain; path-style addressing when an endpoint
    URL is configured (``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3`` or the config file),
    since S3-compatible servers and emulators rarely serve bucket subdomains."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise missing_sdk("s3", "boto3", "s3") from exc

    session = boto3.session.Session()  # one session: a second client reuses its models

    def make(addressing_style: str) -> Any:
        config = Config(
            retries={"mode": "standard", "max_attempts": _MAX_ATTEMPTS},
            connect_timeout=_CONNECT_TIMEOUT,
            read_timeout=_READ_TIMEOUT,
            s3={"addressing_style": addressing_style},
        )
        return session.client("s3", config=config)

    client = make("auto")
    if _is_aws(client.meta.endpoint_url):
        return client
    return make("path")


def _is_aws(endpoint_url: str) -> bool:
    host = urlsplit(endpoint_url).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws"))


def translate(exc: BaseException, url: str) -> StorageError:
    """The StorageError for a boto3/botocore error on ``url``."""
    from botocore import exceptions as bx

    cause = _root_cause(exc)
    if isinstance(cause, bx.ClientError):
        return _client_error(cause, url)
    if isinstance(
        cause,
        (
            bx.NoCredentialsError,
            bx.PartialCredentialsError,
            bx.CredentialRetrievalError,
            bx.TokenRetrievalError,
        ),
    ):
        return AccessDenied(
            f"no usable AWS credentials for {url} ({type(cause).__name__}): set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or give the VM an "
            "instance role"
        )
    if isinstance(cause, bx.SSLError):
        return StorageError(f"TLS error talking to S3 for {url}: check AWS_ENDPOINT_URL and CAs")
    if isinstance(cause, (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError)):
        return TransientStorageError(
            f"S3 unreachable or connection dropped for {url} ({type(cause).__name__}); "
            "worth retrying"
        )
    # botocore's own text (e.g. "Invalid bucket name") names parameters, never credentials.
    return StorageError(f"S3 request for {url} failed: {type(cause).__name__}: {cause}")


def _client_error(exc: Any, url: str) -> StorageError:
    code = _code(exc)
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code == "NoSuchBucket":
        bucket = urlsplit(url).netloc
        return StorageNotFound(
            f"bucket s3://{bucket} does not exist (for {url}): check the bucket name, "
            "and the endpoint and region boto3 uses"
        )
    if code in _NOT_FOUND_CODES or status == 404:
        return StorageNotFound(f"{url} does not exist (no such object): check the URL")
    if code in _DENIED_CODES or status in (401, 403):
        return AccessDenied(
            f"access denied to {url} ({code}): check that the credentials boto3 finds "
            "(environment, profile, instance role) are valid and allowed on this bucket"
        )
    if code in _TRANSIENT_CODES or status == 429 or status >= 500:
        return TransientStorageError(f"S3 is busy or failing for {url} ({code}); worth retrying")
    message = exc.response.get("Error", {}).get("Message", "")
    return StorageError(f"S3 refused the request for {url} ({code}: {message})")


def _code(exc: BaseException | None) -> str:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", ""))


def _root_cause(exc: BaseException) -> BaseException:
    """boto3's S3UploadFailedError wraps the ClientError that says what went wrong."""
    from boto3.exceptions import S3UploadFailedError

    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        return exc.__context__
    return exc
