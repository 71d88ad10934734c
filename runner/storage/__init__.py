"""Pick the storage backend for a URL by its scheme; each backend is imported on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from runner.errors import MissingDependency, UnsupportedUrl
from runner.storage.base import Storage

__all__ = ["BACKENDS", "Storage", "bucket_and_key", "join", "missing_sdk", "redact", "resolve"]

# scheme -> "module:factory"; the factory takes the URL and returns (backend, key).
# Dotted paths, not imports, so that resolving a file:// URL never imports boto3.
BACKENDS: dict[str, str] = {
    "s3": "runner.storage.s3:from_url",
    "gs": "runner.storage.gcs:from_url",
    "az": "runner.storage.azure:from_url",
    "abfs": "runner.storage.azure:from_url",
    "abfss": "runner.storage.azure:from_url",
    "https": "runner.storage.http:from_url",
    "http": "runner.storage.http:from_url",
    "file": "runner.storage.local:from_url",
    "": "runner.storage.local:from_url",  # a plain path, absolute or relative
}

Factory = Callable[[str], tuple[Storage, str]]


def resolve(url: str) -> tuple[Storage, str]:
    """The backend that serves ``url`` and the key of the object inside it."""
    return _factory(scheme_of(url))(url)


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased; ``""`` for a plain path."""
    if "://" not in url:
        return ""  # "/tmp/x", "rel/x" and even "c:x" are paths here
    return urlsplit(url).scheme.lower()


def _factory(scheme: str) -> Factory:
    target = BACKENDS.get(scheme)
    if target is None:
        raise UnsupportedUrl(
            f"unsupported storage URL scheme {scheme + '://'!r}; supported: {supported()}"
        )
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def supported() -> str:
    """The schemes users may write, for error messages."""
    return ", ".join(f"{scheme}://" for scheme in BACKENDS if scheme) + " and local paths"


def join(url: str, name: str) -> str:
    """``url`` with one more path component, ``name``; a ``?query`` or ``#fragment``
    (a presigned URL's signature, a ``#sha256=`` digest) stays at the end."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"join() takes one path component, got {name!r}")
    if scheme_of(url) == "":
        # A path: '?' and '#' are ordinary characters in file names.
        return f"{url.rstrip('/')}/{name}" if url else name
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))


def redact(url: str) -> str:
    """``url`` fit for a message: no user:password, no query string (signatures, SAS
    tokens), no fragment."""
    if scheme_of(url) == "":
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    # In abfs[s]://container@account.dfs.core.windows.net the user part is the container.
    if "@" in netloc and parts.scheme.lower() not in ("abfs", "abfss"):
        netloc = "***@" + netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def missing_sdk(scheme: str, package: str, extra: str) -> MissingDependency:
    """The error for a backend whose SDK is not installed, with the command that fixes it."""
    return MissingDependency(
        f"{scheme}:// URLs need the {package} package, which is not installed: "
        f"pip install 'prefect-vm-runner[{extra}]'"
    )


def bucket_and_key(url: str) -> tuple[str, str]:
    """``("bucket", "path/key")`` from ``scheme://bucket/path/key``. The query and the
    fragment (a ``#sha256=`` digest) are not part of the key."""
    parts = urlsplit(url)
    if not parts.netloc:
        raise UnsupportedUrl(f"{redact(url)} names no bucket: write {parts.scheme}://BUCKET/KEY")
    return parts.netloc, parts.path.lstrip("/")
