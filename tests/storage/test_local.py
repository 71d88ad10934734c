"""Local specifics: atomic uploads, file:// URLs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from runner.errors import StorageError, StorageNotFound
from runner.storage import resolve


def test_upload_leaves_no_temp_files(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.write_bytes(b"data")
    storage, key = resolve(str(tmp_path / "store" / "deep" / "x.tar.gz"))
    storage.upload(source, key)
    assert sorted(p.name for p in (tmp_path / "store" / "deep").iterdir()) == ["x.tar.gz"]
    assert (tmp_path / "store" / "deep" / "x.tar.gz").stat().st_mode & 0o777 == 0o644


def test_failed_upload_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "x.tar.gz"
    dest.write_bytes(b"old")
    source = tmp_path / "source"
    source.write_bytes(b"new content")
    storage, key = resolve(str(dest))

    def copy_half_then_fail(src, dst, length=0):
        dst.write(src.read(3))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", copy_half_then_fail)
    with pytest.raises(StorageError, match="No space left"):
        storage.upload(source, key)
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source", "x.tar.gz"]


def test_file_url_with_escapes_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "with space#and hash" / "x.tar.gz"
    path.parent.mkdir()
    path.write_bytes(b"abc")
    storage, key = resolve(path.as_uri())
    assert storage.read_range(key, 1, 5) == b"bc"
    assert resolve(storage.url(key))[1] == key


def test_a_directory_is_not_an_object(tmp_path: Path) -> None:
    storage, key = resolve(str(tmp_path))
    assert not storage.exists(key)
    with pytest.raises(StorageNotFound, match=str(tmp_path)):
        storage.size(key)
