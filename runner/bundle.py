"""Code bundles: deterministic tar.gz build, sha256 naming, digest check, safe extraction, cache."""

from __future__ import annotations

import copy
import fcntl
import gzip
import hashlib
import io
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pathspec

from runner.errors import BundleError, ConfigError
from runner.storage import redact

log = logging.getLogger("runner")

SUFFIX = ".tar.gz"
_DIGEST_FRAGMENT = re.compile(r"^sha256=([0-9a-f]{64})$")
# Never worth shipping, whatever the ignore files say.
_ALWAYS_IGNORED = [".git/", "__pycache__/", "*.pyc", ".venv/", ".runner-work/", ".DS_Store"]
# Names that usually hold credentials: bundled anyway (the author decides), but warned about.
_LIKELY_SECRETS = pathspec.GitIgnoreSpec.from_lines(
    [
        ".env",
        ".env.*",
        "*.pem",
        "*.key",
        "*.p12",
        "*.pfx",
        "id_rsa*",
        "id_ed25519*",
        ".netrc",
        ".pgpass",
        "credentials",
        "credentials.json",
        ".aws/",
        "service-account*.json",
    ]
)
_MTIME = 0  # fixed, so that the same tree always gives the same bytes
_LEVEL = 6  # gzip's own default: Python's 9 is several times slower for a few % smaller


# --- naming ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleRef:
    """Where a bundle is and which sha256 it must have."""

    url: str  # without the #sha256= fragment
    sha256: str


def parse_url(url: str, *, suffix: str = SUFFIX, what: str = "bundle") -> BundleRef:
    """Read the expected digest from a ``<sha256><suffix>`` name or a ``#sha256=``
    fragment (content-addressed objects: bundles, and environment specs)."""
    base, _, fragment = url.partition("#")
    if fragment:
        if match := _DIGEST_FRAGMENT.match(fragment):
            return BundleRef(base, match.group(1))
        raise ConfigError(f"{what} URL fragment must be #sha256=<64 hex digits>, got #{fragment}")
    name_pattern = re.compile(r"(?:^|/)([0-9a-f]{64})" + re.escape(suffix) + "$")
    if match := name_pattern.search(base.split("?", 1)[0]):
        return BundleRef(base, match.group(1))
    raise ConfigError(
        f"{what} URL {redact(base)} names no digest: it must end in <sha256>{suffix} "
        "(as `push` prints) or carry a #sha256=<hex> fragment"
    )


# --- build ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    path: Path
    sha256: str
    files: int
    size: int


def build(source: Path, dest_dir: Path, *, extra: dict[str, bytes] | None = None) -> Built:
    """Pack ``source`` into ``dest_dir/<sha256>.tar.gz``, byte-for-byte reproducible:
    sorted entries, fixed mtimes, owners and modes, no gzip timestamp or name.
    ``extra`` adds generated top-level files (a captured environment), replacing any
    file of the same name in ``source``."""
    source = source.resolve()
    if not source.is_dir():
        raise ConfigError(f"bundle source {source} is not a directory")
    extra = extra or {}
    files = [p for p in _files_to_bundle(source) if p.relative_to(source).as_posix() not in extra]
    _refuse_runner_shadowing(p.relative_to(source).as_posix() for p in files)
    for path in files:
        rel = path.relative_to(source).as_posix()
        if _LIKELY_SECRETS.match_file(rel):
            log.warning(
                "bundle includes %s, which looks like a secret; add it to "
                ".prefectignore unless the flow really needs it",
                rel,
            )
    fd, name = tempfile.mkstemp(dir=dest_dir, suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as raw:
            hashing = _HashingWriter(raw, digest)
            with (
                gzip.GzipFile(
                    filename="", mode="wb", fileobj=hashing, mtime=_MTIME, compresslevel=_LEVEL
                ) as gz,
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for path in files:
                    _add(tar, path, path.relative_to(source).as_posix())
                for name, data in sorted(extra.items()):
                    _add_bytes(tar, name, data)
        final = dest_dir / f"{digest.hexdigest()}{SUFFIX}"
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Built(final, digest.hexdigest(), len(files) + len(extra), final.stat().st_size)


class _HashingWriter(io.RawIOBase):
    """Hash the compressed bytes as they are written: the digest costs no second read."""

    def __init__(self, raw: io.BufferedWriter, digest: Any) -> None:
        self._raw = raw
        self._digest = digest

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._digest.update(data)
        return self._raw.write(data)


def _files_to_bundle(source: Path) -> list[Path]:
    """Files and symlinks under ``source`` not ignored by .gitignore/.prefectignore, sorted
    by their path in the bundle."""
    return sorted(_walk(source), key=lambda p: p.relative_to(source).as_posix())


def _walk(source: Path) -> Iterator[Path]:
    lines = list(_ALWAYS_IGNORED)
    for name in (".gitignore", ".prefectignore"):
        if (source / name).is_file():
            lines += (source / name).read_text().splitlines()
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    for root, dirs, names in os.walk(source):
        rel_root = Path(root).relative_to(source)
        # Prune ignored directories so that a huge ignored tree (.venv) is never walked.
        dirs[:] = sorted(d for d in dirs if not spec.match_file(f"{(rel_root / d).as_posix()}/"))
        for name in sorted(names):
            rel = (rel_root / name).as_posix()
            if not spec.match_file(rel):
                yield Path(root) / name


def _add(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    info = tar.gettarinfo(str(path), arcname)
    info.mtime = _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if info.isreg():
        info.mode = 0o755 if info.mode & stat.S_IXUSR else 0o644
        with open(path, "rb") as fh:
            tar.addfile(info, fh)
    elif info.issym():
        info.mode = 0o777
        tar.addfile(info)
    # other types (sockets, fifos) are not code: skipped


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def _refuse_runner_shadowing(names: Iterator[str] | list[str]) -> None:
    for name in names:
        top = name.split("/", 1)[0]
        if top == "runner" or top.startswith("runner."):
            raise BundleError(
                f"the bundle's top level holds its own 'runner' module ({top}), which would "
                "shadow prefect-vm-runner's import package; rename it (e.g. to "
                "'my_runner') and update its imports"
            )


# --- safe extraction -------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Bounds on what one bundle may expand to (zip-bomb protection)."""

    max_bytes: int
    max_files: int


# PEP 706's extraction filters came with Python 3.11.4 and 3.10.12; Debian 12's Python
# (the VM images' and the Debian container base's) is 3.11.2.
_HAS_DATA_FILTER = hasattr(tarfile, "data_filter")
_FILTER_ERRORS = getattr(tarfile, "FilterError", ())


def extract(archive: Path, dest: Path, *, limits: Limits) -> int:
    """Extract ``archive`` into ``dest`` (replacing it); return the bytes written.

    Each member is checked before anything of it is written (see ``_Checker``), and
    the inflated stream is bounded by what the checked members account for (see
    ``_Inflation``), so a compression bomb is refused before it fills the disk or
    memory, not after it inflated. Members are then extracted with Python's ``data``
    filter (PEP 706) as a second line of defence, or, on a Python without it, with what
    that filter does to the member done by hand (``_as_data``). On any error nothing is
    left behind."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    checker = _Checker(limits)
    try:
        with gzip.open(archive) as inflated:
            stream = _Inflation(inflated)
            with tarfile.open(fileobj=stream, mode="r:") as tar:
                for member in tar:
                    checker.check(member)
                    stream.passed(member)
                    if _HAS_DATA_FILTER:
                        tar.extract(member, partial, filter="data")
                    else:
                        tar.extract(_as_data(member), partial)
        shutil.rmtree(dest, ignore_errors=True)  # a retried run extracts afresh
        os.replace(partial, dest)
        return checker.total
    except _FILTER_ERRORS as exc:  # before TarError: it is one
        raise BundleError(
            f"bundle member {exc.tarinfo.name!r} is unsafe: {_filter_reason(exc)}"
        ) from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BundleError(f"bundle archive is corrupt or truncated: {exc}") from None
    except OSError as exc:  # the disk, not the archive
        raise BundleError(f"could not extract the bundle into {dest}: {exc}") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)


class _Inflation:
    """The inflated tar stream, refused past the end of the last checked member's data
    plus room for the next member's headers: so neither a member's data nor a header
    tarfile reads whole into memory (a pax or GNU long-name header can claim gigabytes)
    inflates unbounded. Counted on the stream, before each read, whatever headers say."""

    SLACK = 1 << 20  # the next member's headers, read before it can be checked

    def __init__(self, inflated: gzip.GzipFile) -> None:
        self._inflated = inflated
        self.checked_end = 0  # where the last checked member's data ends in the stream

    def read(self, size: int = -1) -> bytes:
        self._within(self._inflated.tell() + size if size >= 0 else None)
        return self._inflated.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._within(offset)  # forward seeks inflate too
        elif whence == io.SEEK_CUR:
            self._within(self._inflated.tell() + offset)
        else:
            self._within(None)  # to the end: the whole stream
        return self._inflated.seek(offset, whence)

    def tell(self) -> int:
        return self._inflated.tell()

    def passed(self, member: tarfile.TarInfo) -> None:
        """``member`` passed the checks: the stream may go on to the end of its data."""
        data = member.size if member.isreg() else 0  # only regular members carry data
        self.checked_end = member.offset_data + -(-data // 512) * 512

    def _within(self, end: int | None) -> None:
        allowed = self.checked_end + self.SLACK
        if end is None or end > allowed:
            raise BundleError(
                f"bundle inflates past what its members account for (refused at "
                f"{self._inflated.tell()} of at most {allowed} bytes; a compression bomb?); "
                "it is not an archive `bundle push` made"
            )


class _Checker:
    """The rules every member must pass, stricter than the data filter: `bundle push`
    never makes a bundle that breaks them, so one that does is refused, not repaired.

    - names are relative, without ``..``, and unique (a second entry could replace
      a symlink and write through it);
    - no member lies below a symlink of the bundle (a link to ``.`` or a long
      chain of them is how filters have been escaped);
    - symlink targets are relative and without ``..``; hard links name an earlier
      regular file;
    - nothing at the top level is named ``runner`` or ``runner.*``;
    - the member count and expanded size stay within the limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self._count = 0
        self._seen: set[str] = set()
        self._symlinks: set[str] = set()
        self._files: set[str] = set()

    def check(self, member: tarfile.TarInfo) -> None:
        name = self._name(member)
        self._within_limits(member)
        parents = name.split("/")[:-1]
        for depth in range(1, len(parents) + 1):
            if "/".join(parents[:depth]) in self._symlinks:
                raise _unsafe(member, "path goes through a symlink of the bundle")
        if member.issym():
            self._link_target(member)
            self._symlinks.add(name)
        elif member.islnk():
            if posixpath.normpath(member.linkname) not in self._files:
                raise _unsafe(member, "hard link to something that is not an earlier file")
        elif member.isreg():
            self._files.add(name)
        elif not member.isdir():
            raise _unsafe(member, "device or special file")
        _refuse_runner_shadowing([name])

    def _name(self, member: tarfile.TarInfo) -> str:
        raw = member.name
        if raw.startswith("/"):
            raise _unsafe(member, "absolute path")
        if ".." in raw.split("/"):
            raise _unsafe(member, "'..' component")
        name = posixpath.normpath(raw)
        if name in self._seen:
            raise _unsafe(member, "appears twice in the bundle")
        self._seen.add(name)
        return name

    def _link_target(self, member: tarfile.TarInfo) -> None:
        target = member.linkname
        if target.startswith("/"):
            raise _unsafe(member, "link to an absolute path")
        if ".." in target.split("/"):
            raise _unsafe(member, "link points outside the extraction directory ('..')")

    def _within_limits(self, member: tarfile.TarInfo) -> None:
        self._count += 1
        self.total += member.size if member.isreg() else 0
        if self._count > self.limits.max_files:
            raise BundleError(
                f"bundle has more than {self.limits.max_files} members (stopped at "
                f"{member.name!r}); raise --max-bundle-files if that is expected"
            )
        if self.total > self.limits.max_bytes:
            raise BundleError(
                f"bundle expands to more than {self.limits.max_bytes} bytes (stopped at "
                f"{member.name!r}); raise --max-bundle-bytes if that is expected"
            )


def _as_data(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """What the data filter does to a member the checker let through: no owner from the
    archive (a root runner would chown to it), no setuid/setgid/sticky bits, no group or
    other write bit; a regular file stays readable and writable by its owner."""
    safe = copy.copy(member)
    safe.uid, safe.gid, safe.uname, safe.gname = os.geteuid(), os.getegid(), "", ""
    if not safe.issym():
        safe.mode = (safe.mode & 0o755) | (0o600 if safe.isreg() else 0)
    return safe


def _unsafe(member: tarfile.TarInfo, reason: str) -> BundleError:
    return BundleError(f"bundle member {member.name!r} is unsafe: {reason}")


def _filter_reason(exc: Exception) -> str:
    reasons = {
        tarfile.AbsolutePathError: "absolute path",
        tarfile.OutsideDestinationError: "path leaves the extraction directory",
        tarfile.AbsoluteLinkError: "link to an absolute path",
        tarfile.LinkOutsideDestinationError: "link points outside the extraction directory",
        tarfile.SpecialFileError: "device or special file",
    }
    return next((text for kind, text in reasons.items() if isinstance(exc, kind)), str(exc))


# --- cache -----------------------------------------------------------------------------


class BundleCache:
    """Verified objects by digest under ``root``; a file there has been checked already."""

    def __init__(self, root: Path, *, suffix: str = SUFFIX, what: str = "bundle") -> None:
        self.root = root
        self._suffix = suffix
        self._what = what

    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}{self._suffix}"

    @contextmanager
    def locked(self, sha256: str) -> Iterator[None]:
        """One download per digest, however many runners share the cache."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{sha256}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def fetch(self, ref: BundleRef, download: Callable[[Path], str]) -> tuple[Path, bool]:
        """The cached archive for ``ref`` and whether it was a cache hit. ``download``
        writes the object to the path it is given and returns the sha256 it saw."""
        cached = self.path(ref.sha256)
        if cached.is_file():
            return cached, True
        with self.locked(ref.sha256):
            if cached.is_file():  # another runner fetched it while we waited
                return cached, True
            # Under the lock, any partial download of this digest is a dead runner's.
            for stale in self.root.glob(f".{ref.sha256}.*.partial"):
                stale.unlink(missing_ok=True)
            tmp = cached.with_name(f".{ref.sha256}.{os.getpid()}.partial")
            try:
                seen = download(tmp)
                if seen != ref.sha256:
                    raise BundleError(
                        f"{self._what} digest mismatch for {redact(ref.url)}: expected sha256 "
                        f"{ref.sha256}, got {seen}; the object was changed or corrupted"
                    )
                os.replace(tmp, cached)
            finally:
                tmp.unlink(missing_ok=True)
        return cached, False


def throttled(
    report: Callable[[int, int, float], None], every: float = 2.0
) -> Callable[[int, int], None]:
    """A progress callback that reports every ``every`` seconds while work goes on
    (quick transfers say nothing here; the caller reports their end)."""
    started = time.monotonic()
    last = started

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if done < total and now - last >= every:
            last = now
            report(done, total, now - started)

    return progress
