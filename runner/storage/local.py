"""file:// URLs and plain paths: the local filesystem (or anything mounted on it)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

from runner.errors import AccessDenied, StorageError, StorageNotFound, UnsupportedUrl
from runner.storage import redact, scheme_of

_PART = ".part"  # suffix of an upload in progress: .<name>.<random>.part


def from_url(url: str) -> tuple[LocalStorage, str]:
    """Keys are absolute paths without the leading ``/``; relative paths are taken from
    the current directory, so that ``url(key)`` names the same file from anywhere."""
    if scheme_of(url) == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise UnsupportedUrl(
                f"{redact(url)} names a remote host: file:// URLs are local, write file:///PATH"
            )
        path = Path(unquote(parts.path))
    else:
        path = Path(url).expanduser()
    return LocalStorage(), os.path.abspath(path).lstrip("/")


class LocalStorage:
    """The filesystem from ``root``; an upload lands whole or not at all."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def url(self, key: str) -> str:
        return self.path(key).as_uri()

    def size(self, key: str) -> int:
        path = self.path(key)
        with _translated(path):
            stat = path.stat()
            if not path.is_file():
                raise IsADirectoryError(errno.EISDIR, "not a file", str(path))
            return stat.st_size

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def read_range(self, key: str, start: int, length: int) -> bytes:
        path = self.path(key)
        # Each call opens its own file: no shared offset between threads.
        with _translated(path), open(path, "rb") as file:
            file.seek(start)
            return file.read(max(length, 0))

    def upload(self, path: Path, key: str) -> None:
        dest = self.path(key)
        with open(path, "rb") as src, _translated(dest):
            dest.parent.mkdir(parents=True, exist_ok=True)  # like a bucket: no directories
            # Copy to a temp file beside the destination and rename it into place, so a
            # reader never sees half a file and a failed copy leaves the old one.
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=_PART, dir=dest.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, 1024 * 1024)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, 0o644)  # mkstemp makes it 0600
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def list(self, prefix: str) -> list[str]:
        # Walk only the directory the prefix is in, not the whole root.
        top = self.path(prefix.rpartition("/")[0])
        with _translated(top):
            if not top.is_dir():
                return []
            keys = [
                str(path.relative_to(self.root))
                for path in top.rglob("*")
                if path.is_file() and not _is_partial(path.name)
            ]
        return sorted(key for key in keys if key.startswith(prefix))


def _is_partial(name: str) -> bool:
    return name.startswith(".") and name.endswith(_PART)


@contextmanager
def _translated(path: Path) -> Iterator[None]:
    """Turn OS errors inside the block into StorageErrors naming ``path``."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        raise StorageNotFound(f"{path} does not exist (no such file): check the path") from exc
    except PermissionError as exc:
        raise AccessDenied(f"permission denied on {path}: check its owner and mode") from exc
    except OSError as exc:
        raise StorageError(f"cannot access {path}: {exc.strerror or exc}") from exc
