"""https:// and http:// URLs: presigned or public objects, through httpx; no credentials."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from runner.errors import (
    AccessDenied,
    StorageError,
    StorageNotFound,
    TransientStorageError,
    UnsupportedUrl,
)
from runner.storage import redact
from runner.storage.base import ExistsBySize

_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
_TOTAL = re.compile(r"^bytes (?:\d+-\d+|\*)/(\d+)$")


def from_url(url: str) -> tuple[HttpStorage, str]:
    """The key is the whole URL, query (a presigned URL's signature) included."""
    return HttpStorage(), url


class HttpStorage(ExistsBySize):
    """Objects addressed by their own URL. Presigned URLs are signed for one method,
    so the size comes from a one-byte ranged GET rather than a HEAD."""

    def __init__(self, *, client: httpx.Client | None = None) -> None:
        # httpx.Client is thread-safe; its pool keeps connections for the reading threads.
        self._client = client or httpx.Client(
            timeout=_TIMEOUT,
            follow_redirects=True,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        )

    def url(self, key: str) -> str:
        return key

    def size(self, key: str) -> int:
        with (
            self._translated(key),
            self._client.stream("GET", key, headers=_ranged("bytes=0-0")) as response,
        ):
            if response.status_code in (206, 416):
                # 416 is what an empty object answers; both carry "bytes .../TOTAL".
                if match := _TOTAL.match(response.headers.get("Content-Range", "")):
                    return int(match.group(1))
            elif response.status_code == 200 and "Content-Length" in response.headers:
                return int(response.headers["Content-Length"])  # the server ignored Range
            else:
                raise_for_status(response, key)
            raise StorageError(
                f"{redact(key)} did not say its size (no Content-Range or Content-Length): "
                "serve it from a server that supports Range requests"
            )

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        byte_range = f"bytes={start}-{start + length - 1}"
        with (
            self._translated(key),
            self._client.stream("GET", key, headers=_ranged(byte_range)) as response,
        ):
            if response.status_code == 416:
                return b""  # start is at or past the end of the object
            raise_for_status(response, key)
            # Raw bytes: an object stored with Content-Encoding: gzip is read as stored.
            if response.status_code == 206:
                return b"".join(response.iter_raw())
            return _slice(response.iter_raw(), start, length)  # Range ignored: skip ahead

    def upload(self, path: Path, key: str) -> None:
        # x-ms-blob-type is what an Azure SAS URL needs on a PUT; S3 and GCS ignore it.
        headers = {"x-ms-blob-type": "BlockBlob", "Content-Type": "application/octet-stream"}
        with self._translated(key), open(path, "rb") as data:
            response = self._client.put(key, content=data, headers=headers)
            raise_for_status(response, key)

    def list(self, prefix: str) -> list[str]:
        raise UnsupportedUrl(
            f"cannot list {redact(prefix)}: HTTP has no listing; use the bucket's own "
            "URL scheme (s3://, gs://, az://)"
        )

    @contextmanager
    def _translated(self, key: str) -> Iterator[None]:
        """Turn any httpx error inside the block into a StorageError."""
        try:
            yield
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.UnsupportedProtocol):
                raise UnsupportedUrl(f"{redact(key)} is not an http(s) URL") from exc
            raise TransientStorageError(
                f"{redact(key)} unreachable or connection dropped ({type(exc).__name__}); "
                "worth retrying"
            ) from exc
        except httpx.InvalidURL as exc:
            raise UnsupportedUrl(f"{redact(key)} is not a valid URL") from exc


def raise_for_status(response: httpx.Response, key: str) -> None:
    """Raise the StorageError that an error status means; nothing for 1xx-3xx."""
    status = response.status_code
    if status < 400:
        return
    url = redact(key)
    if status in (401, 403):
        raise AccessDenied(
            f"access denied to {url} (HTTP {status}): the URL's signature may have expired "
            "or not allow this method; presign a new one"
        )
    if status in (404, 410):
        raise StorageNotFound(f"{url} does not exist (HTTP {status}): check the URL")
    if status in (408, 425, 429) or status >= 500:
        raise TransientStorageError(f"{url} answered HTTP {status}; worth retrying")
    raise StorageError(f"{url} answered HTTP {status}")


def _ranged(byte_range: str) -> dict[str, str]:
    # identity: byte offsets are into the stored object, not a compressed rendition of it
    return {"Range": byte_range, "Accept-Encoding": "identity"}


def _slice(chunks: Iterator[bytes], start: int, length: int) -> bytes:
    """Bytes ``start`` to ``start + length`` of a stream that starts at byte 0."""
    out = bytearray()
    position = 0
    for chunk in chunks:
        end = position + len(chunk)
        if end > start:
            out += chunk[max(start - position, 0) : start + length - position]
            if len(out) >= length:
                break
        position = end
    return bytes(out)
