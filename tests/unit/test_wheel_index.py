"""The test wheel index: well-formed wheels, PEP 503 pages, and real installs by uv and pip."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.storage_servers import HttpFileServer
from devtools.wheel_index import DEFAULT_SET, WheelSpec, build_index, build_wheel, project_names

# Only the index under test: no user or system pip/uv configuration (extra indexes,
# find-links) may satisfy a requirement behind its back.
_CLEAN_ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))},
    "PIP_CONFIG_FILE": os.devnull,
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "UV_NO_CONFIG": "1",
}
_CLEAN_ENV.pop("VIRTUAL_ENV", None)


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = build_index(tmp_path_factory.mktemp("index"))
    with HttpFileServer(root) as http:
        yield f"{http.url}/simple"


def _uv() -> str:
    from uv import find_uv_bin

    return find_uv_bin()


def _installed(python: Path, *modules: str) -> dict[str, str]:
    """Each module's VALUE, as the venv's interpreter imports it."""
    code = "import importlib, sys\nfor m in sys.argv[1:]: print(importlib.import_module(m).VALUE)"
    out = subprocess.run(
        [str(python), "-c", code, *modules], check=True, capture_output=True, text=True
    ).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_wheels_are_reproducible_and_their_record_matches() -> None:
    spec = WheelSpec("rvm-x.y", "0.1", ("rvm-core<2",))
    wheel, metadata = build_wheel(spec)
    assert build_wheel(spec) == (wheel, metadata)  # fixed timestamps: same bytes
    assert spec.filename == "rvm_x_y-0.1-py3-none-any.whl"
    with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
        dist_info = "rvm_x_y-0.1.dist-info"
        assert archive.read(f"{dist_info}/METADATA") == metadata
        assert b"Requires-Dist: rvm-core<2" in metadata
        assert b"Tag: py3-none-any" in archive.read(f"{dist_info}/WHEEL")
        rows = list(csv.reader(io.StringIO(archive.read(f"{dist_info}/RECORD").decode())))
        assert {row[0] for row in rows} == set(archive.namelist())
        for path, digest, size in rows:
            if path.endswith("RECORD"):
                assert digest == size == ""
                continue
            data = archive.read(path)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == f"sha256={expected.decode()}" and int(size) == len(data)
        assert b"import rvm_core" in archive.read("rvm_x_y/__init__.py")


def test_pages_link_every_wheel_with_its_sha256(index: str) -> None:
    root_page = httpx.get(f"{index}/")
    assert root_page.headers["content-type"] == "text/html"
    assert set(re.findall(r'href="([^"]+)/"', root_page.text)) == set(project_names())
    page = httpx.get(f"{index}/rvm-core/")
    links = re.findall(r'href="([^"#]+)#sha256=([0-9a-f]{64})"', page.text)
    assert [name for name, _ in links] == [
        f"rvm_core-{v}-py3-none-any.whl" for v in ("1.0.0", "1.1.0", "2.0.0")
    ]
    for name, digest in links:
        assert hashlib.sha256(httpx.get(f"{index}/rvm-core/{name}").content).hexdigest() == digest


def test_uv_resolves_dependencies_against_specifiers(index: str, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    env = {**_CLEAN_ENV, "UV_CACHE_DIR": str(tmp_path / "uv-cache")}
    uv = _uv()
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True, env=env)
    python = venv / "bin" / "python"
    subprocess.run(
        [uv, "pip", "install", "-q", "--python", str(python), "--index-url", index, "rvm-config"],
        check=True,
        env=env,
    )
    # rvm-util requires rvm-core>=1.1,<2: the newest, 2.0.0, must not be chosen.
    assert _installed(python, "rvm_config", "rvm_util", "rvm_json", "rvm_core") == {
        "rvm-config": "2.1.0",
        "rvm-util": "1.0.0",
        "rvm-json": "1.2.0",
        "rvm-core": "1.1.0",
    }


def test_pip_installs_into_a_stdlib_venv(index: str, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=_CLEAN_ENV)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-cache-dir", "--index-url", index]
        + ["rvm-cache", "rvm-log"],
        check=True,
        env=_CLEAN_ENV,
    )
    assert _installed(venv / "bin" / "python", "rvm_cache", "rvm_log", "rvm_core") == {
        "rvm-cache": "0.2.0",
        "rvm-log": "0.3.0",
        "rvm-core": "1.1.0",  # rvm-cache's <2 holds rvm-log's bare rvm-core back
    }


def test_default_set_is_a_connected_graph_of_prefixed_projects() -> None:
    names = project_names()
    assert len(names) == 20 and all(name.startswith("rvm-") for name in names)
    for spec in DEFAULT_SET:
        for requirement in spec.requires:
            assert re.split(r"[<>=!~]", requirement)[0] in names
