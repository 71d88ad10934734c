"""Bundles: reproducible builds, ignore files, digest naming, and safe extraction."""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from pathlib import Path

import pytest

from runner.bundle import BundleCache, BundleRef, Limits, build, extract, parse_url
from runner.errors import BundleError, ConfigError

LIMITS = Limits(max_bytes=10 * 1024 * 1024, max_files=1000)
SHA = "a" * 64


def _project(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "flow.py").write_text("print('flow')\n")
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "data.csv").write_text("a,b\n1,2\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "ignored.log").write_text("noise")
    (root / "build").mkdir()
    (root / "build" / "artifact.bin").write_bytes(b"\0" * 100)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "flow.cpython-311.pyc").write_bytes(b"pyc")
    (root / ".gitignore").write_text("*.log\n")
    (root / ".prefectignore").write_text("build/\n")
    return root


def _names(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return tar.getnames()


def test_build_is_reproducible_and_named_by_digest(tmp_path):
    source = _project(tmp_path / "src")
    (tmp_path / "a").mkdir()
    first = build(source, tmp_path / "a")
    (source / "flow.py").touch()  # a new mtime must not change the bytes
    second_dir = tmp_path / "b"
    second_dir.mkdir()
    second = build(source, second_dir)
    assert first.sha256 == second.sha256
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.path.name == f"{hashlib.sha256(first.path.read_bytes()).hexdigest()}.tar.gz"


def test_build_honours_ignore_files_and_normalises_metadata(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    built = build(_project(tmp_path / "src"), out)
    names = _names(built.path)
    assert names == sorted(names)
    assert "flow.py" in names and "pkg/data.csv" in names and ".gitignore" in names
    assert not any(n.endswith(".log") or n.startswith("build") or "__pycache__" in n for n in names)
    with tarfile.open(built.path) as tar:
        for member in tar:
            assert (member.mtime, member.uid, member.gid, member.uname) == (0, 0, 0, "")
        assert tar.getmember("run.sh").mode == 0o755
        assert tar.getmember("flow.py").mode == 0o644


def test_build_warns_about_likely_secrets(tmp_path, caplog):
    source = _project(tmp_path / "src")
    (source / ".env").write_text("TOKEN=hunter2\n")
    out = tmp_path / "out"
    out.mkdir()
    with caplog.at_level(logging.WARNING, logger="runner"):
        build(source, out)
    assert any(".env" in r.getMessage() and "secret" in r.getMessage() for r in caplog.records)
    assert "hunter2" not in caplog.text


@pytest.mark.parametrize("shadow", ["runner.py", "runner/__init__.py"])
def test_build_refuses_a_top_level_runner_module(tmp_path, shadow):
    source = tmp_path / "src"
    (source / Path(shadow).parent).mkdir(parents=True, exist_ok=True)
    (source / shadow).write_text("")
    with pytest.raises(BundleError, match="rename it"):
        build(source, tmp_path)


def test_round_trip_extracts_the_tree(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    built = build(_project(tmp_path / "src"), out)
    dest = tmp_path / "work" / "code"
    written = extract(built.path, dest, limits=LIMITS)
    assert (dest / "pkg" / "data.csv").read_text() == "a,b\n1,2\n"
    assert written == sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert not dest.with_name("code.partial").exists()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"s3://b/p/{SHA}.tar.gz", BundleRef(f"s3://b/p/{SHA}.tar.gz", SHA)),
        (f"https://h/x.tgz?sig=1#sha256={SHA}", BundleRef("https://h/x.tgz?sig=1", SHA)),
        (
            f"https://h/p/{SHA}.tar.gz?X-Amz-Signature=s",
            BundleRef(f"https://h/p/{SHA}.tar.gz?X-Amz-Signature=s", SHA),
        ),
    ],
)
def test_digest_comes_from_the_name_or_the_fragment(url, expected):
    assert parse_url(url) == expected


def test_url_without_digest_is_a_config_error_without_the_signature():
    with pytest.raises(ConfigError, match="names no digest") as err:
        parse_url("https://h/code.tar.gz?X-Amz-Signature=topsecret")
    assert "topsecret" not in str(err.value)


# --- hostile archives ----------------------------------------------------------------


def _archive(tmp_path: Path, *members: tarfile.TarInfo, data: bytes = b"x") -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            if member.isreg():
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
            else:
                tar.addfile(member)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_member("/abs/file.txt"), "absolute path"),
        (_member("../escape.txt"), "'..' component"),
        (_member("a/../b.txt"), "'..' component"),
        (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "absolute path"),
        (_member("link", tarfile.SYMTYPE, "../../outside"), "outside the extraction directory"),
        (_member("hard", tarfile.LNKTYPE, "../outside"), "not an earlier file"),
        (_member("hard", tarfile.LNKTYPE, "/etc/passwd"), "not an earlier file"),
        (_member("runner.pyc"), "rename it"),
        (_member("././runner/x.py"), "rename it"),
        (_member("dev", tarfile.CHRTYPE), "device or special file"),
        (_member("runner/__init__.py"), "rename it"),
    ],
)
def test_unsafe_members_are_rejected_and_nothing_is_written(tmp_path, member, reason):
    archive = _archive(tmp_path, _member("ok.txt"), member)
    dest = tmp_path / "work" / "code"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(BundleError) as err:
        extract(archive, dest, limits=LIMITS)
    assert reason in str(err.value)
    assert member.name in str(err.value) or reason == "rename it"
    assert not dest.exists() and not dest.with_name("code.partial").exists()
    assert sorted(tmp_path.rglob("*")) == before + [tmp_path / "work"]


def test_too_large_and_too_many_are_rejected(tmp_path):
    big = _archive(tmp_path, _member("big.bin"), data=b"\0" * 4096)
    with pytest.raises(BundleError, match="expands to more than 1000 bytes"):
        extract(big, tmp_path / "a", limits=Limits(max_bytes=1000, max_files=10))
    many = _archive(tmp_path, *(_member(f"f{i}") for i in range(5)))
    with pytest.raises(BundleError, match="more than 3 members"):
        extract(many, tmp_path / "b", limits=Limits(max_bytes=10**6, max_files=3))


def test_truncated_and_corrupt_archives(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    built = build(_project(tmp_path / "src"), out)
    data = built.path.read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="corrupt or truncated"):
        extract(truncated, tmp_path / "t", limits=LIMITS)
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"this is not a tarball" * 10)
    with pytest.raises(BundleError, match="corrupt or truncated"):
        extract(garbage, tmp_path / "g", limits=LIMITS)


def test_cache_verifies_digest_and_serves_hits(tmp_path):
    cache = BundleCache(tmp_path / "cache")
    payload = b"bundle bytes"
    digest = hashlib.sha256(payload).hexdigest()
    calls = []

    def download(dest: Path) -> str:
        calls.append(dest)
        dest.write_bytes(payload)
        return hashlib.sha256(payload).hexdigest()

    ref = BundleRef("file:///x", digest)
    path, hit = cache.fetch(ref, download)
    assert (path.read_bytes(), hit) == (payload, False)
    path, hit = cache.fetch(ref, download)
    assert hit and len(calls) == 1

    wrong = BundleRef("file:///y", "b" * 64)
    with pytest.raises(BundleError, match="digest mismatch"):
        cache.fetch(wrong, download)
    assert not cache.path("b" * 64).exists()
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == [
        path.name
    ]


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        # A symlink to "." (or a chain of them) and a path through it: how filters escape.
        ([_member("x", tarfile.SYMTYPE, "."), _member("x/runner.py")], "through a symlink"),
        (
            [
                _member("d", tarfile.DIRTYPE),
                _member("d/l", tarfile.SYMTYPE, "../.."),
                _member("d/l/pwned"),
            ],
            "outside the extraction directory",
        ),
        # A second entry of the same name could replace a symlink and write through it.
        ([_member("a", tarfile.SYMTYPE, "b"), _member("a")], "appears twice"),
    ],
)
def test_member_sequences_that_escape_are_rejected(tmp_path, members, reason):
    archive = _archive(tmp_path, *members)
    dest = tmp_path / "work" / "code"
    with pytest.raises(BundleError, match=reason):
        extract(archive, dest, limits=LIMITS)
    assert not dest.exists()
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "work" / "pwned").exists()


def test_extracting_again_replaces_the_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    built = build(_project(tmp_path / "src"), out)
    dest = tmp_path / "work" / "code"
    extract(built.path, dest, limits=LIMITS)
    (dest / "left-over.txt").write_text("from an earlier attempt")
    extract(built.path, dest, limits=LIMITS)
    assert (dest / "flow.py").is_file() and not (dest / "left-over.txt").exists()


def test_without_pep706_filters_members_are_made_data_by_hand():
    """Debian 12's Python 3.11.2 has no extraction filters: `_as_data` does their work."""
    import os

    from runner.bundle import _as_data

    setuid = _member("tool")
    setuid.mode, setuid.uid, setuid.gid, setuid.uname = 0o4777, 4242, 4242, "mallory"
    safe = _as_data(setuid)
    assert safe.mode == 0o755  # no setuid bit, no group/other write
    assert (safe.uid, safe.gid, safe.uname, safe.gname) == (os.geteuid(), os.getegid(), "", "")
    assert setuid.mode == 0o4777  # the archive's own member is left alone

    unreadable = _member("data.txt")
    unreadable.mode = 0o000
    assert _as_data(unreadable).mode == 0o600  # as the data filter: owner read/write
    shared_dir = _member("pkg", tarfile.DIRTYPE)
    shared_dir.mode = 0o777
    assert _as_data(shared_dir).mode == 0o755


def _pax_bomb_after(tmp_path: Path, empty_members: int, header_bytes: int) -> Path:
    """``empty_members`` empty files, then a pax header claiming ``header_bytes`` (zeros),
    which tarfile would read whole into memory before it could be checked."""
    import gzip

    out = io.BytesIO()
    for index in range(empty_members):
        out.write(tarfile.TarInfo(f"e{index}").tobuf(format=tarfile.GNU_FORMAT))
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, header_bytes
    out.write(pax.tobuf(format=tarfile.GNU_FORMAT))
    out.write(b"\0" * (header_bytes + 1024))
    path = tmp_path / "bomb.tar.gz"
    path.write_bytes(gzip.compress(out.getvalue(), compresslevel=1))
    return path


@pytest.mark.parametrize("empty_members", [0, 3000])
def test_a_header_bomb_is_refused_before_it_is_read(tmp_path, empty_members):
    """Many small members before it earn the header no room (the allowance is per member,
    not summed over the members before)."""
    bomb = _pax_bomb_after(tmp_path, empty_members, header_bytes=12 * 1024 * 1024)
    dest = tmp_path / "code"
    with pytest.raises(BundleError, match="inflates past what its members account for"):
        extract(bomb, dest, limits=Limits(max_bytes=10**9, max_files=10**6))
    assert not dest.exists() and not dest.with_name("code.partial").exists()


def test_long_names_and_many_members_extract(tmp_path):
    """What the stream bound must let through: pax headers for long paths, thousands of
    members, directories and symlinks."""
    src = tmp_path / "src"
    deep = src / "/".join(["d" * 200] * 10)  # a 2,000-character path: pax headers
    deep.mkdir(parents=True)
    (deep / ("f" * 200 + ".py")).write_text("x = 1\n")
    for index in range(3000):
        (src / f"m{index}.txt").write_text(str(index))
    (src / "link").symlink_to("m1.txt")
    out = tmp_path / "out"
    out.mkdir()
    built = build(src, out)
    dest = tmp_path / "code"

    extract(built.path, dest, limits=Limits(max_bytes=10**8, max_files=10**4))

    assert (dest / deep.relative_to(src) / ("f" * 200 + ".py")).read_text() == "x = 1\n"
    assert (dest / "m2999.txt").read_text() == "2999" and (dest / "link").read_text() == "1"
