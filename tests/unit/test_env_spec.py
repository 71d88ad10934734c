"""Environment specs: every format into one canonical form, stable digests, the conda
mapping, and one clear error per bad spec."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import pytest

from runner.environment.spec import EnvSpec, find_in, from_bytes, load, to_bytes
from runner.errors import EnvSpecError
from tests.conftest import REPO


def _coiled(*packages: dict, **extra) -> bytes:
    return json.dumps({"packages": list(packages), **extra}).encode()


def _pkg(name: str, specifier: str = "", source: str = "pip", **extra) -> dict:
    return {"name": name, "source": source, "specifier": specifier, "include": True, **extra}


def test_requirements_are_canonical_whatever_the_order_comments_and_line_endings():
    a = from_bytes("requirements.txt", b"rvm-core<2\n# a comment\n\nrvm-app  # why\n")
    b = from_bytes("requirements.txt", b"rvm-app\r\nrvm-core<2\r\n")
    c = from_bytes("requirements.txt", b"rvm-app\nrvm-core<3\n")

    assert a == b and a.digest() == b.digest()
    assert a.digest() != c.digest()
    assert a.kind == "requirements" and a.files == (("requirements.txt", "rvm-app\nrvm-core<2\n"),)


def test_coiled_spec_pip_and_conda_packages():
    spec = from_bytes(
        "senv.json",
        _coiled(
            _pkg("pandas", "==2.2.3"),
            _pkg("numpy", "numpy>=2"),
            _pkg("python", "==3.11.*", source="conda"),
            _pkg("pytorch", "==2.5.1", source="conda", conda_name="pytorch"),
            _pkg("openssl", "==3.0", source="conda"),
            _pkg("skipped", "==1", include=False),
            raw_pip=["rvm-extra>=1"],
        ),
    )

    assert spec.kind == "requirements" and spec.python == "==3.11.*"
    text = spec.files[0][1]
    assert text.splitlines() == ["numpy>=2", "pandas==2.2.3", "rvm-extra>=1", "torch==2.5.1"]
    assert any("pytorch installed from PyPI as torch" in note for note in spec.notes)
    assert any("openssl is not a Python package" in note for note in spec.notes)


def test_conda_only_packages_are_one_error_listing_them_all():
    data = _coiled(_pkg("r-base", "==4", source="conda"), _pkg("cudatoolkit", "", source="conda"))

    with pytest.raises(EnvSpecError, match="no PyPI equivalent: cudatoolkit, r-base"):
        from_bytes("senv.json", data)


def test_coiled_lockfile_content_is_used_as_the_spec():
    lock = 'lock-version = "1.0"\nrequires-python = ">=3.10"\n'
    spec = from_bytes("s.json", _coiled(lockfile_name="pylock.toml", lockfile_content=lock))

    assert spec.kind == "pylock" and spec.python == ">=3.10"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("-r other.txt\n", "includes another file"),
        ("--index-url https://u:p@private/simple\nx\n", "names a package index"),
        ("\n# nothing\n", "lists no packages"),
    ],
)
def test_bad_requirements(text, problem):
    with pytest.raises(EnvSpecError, match=problem) as caught:
        from_bytes("requirements.txt", text.encode())
    assert "u:p@" not in str(caught.value)


def test_bad_specs_name_the_file():
    for name, data, problem in [
        ("senv.json", b"{not json", "not valid JSON"),
        ("senv.json", b'{"something": 1}', "not a Coiled SoftwareEnvSpec"),
        ("pylock.toml", b"packages = [", "not valid TOML"),
        ("pylock.toml", b"packages = []\n", "no lock-version"),
        ("other.toml", b"", "must be a pylock.toml"),
    ]:
        with pytest.raises(EnvSpecError, match=problem) as caught:
            from_bytes(name, data)
        assert name in str(caught.value)


def test_uv_project_needs_both_files(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nrequires-python = ">=3.11"\n')
    with pytest.raises(EnvSpecError, match="needs both pyproject.toml and uv.lock"):
        load(tmp_path)
    (tmp_path / "uv.lock").write_text("version = 1\n")

    spec = load(tmp_path / "pyproject.toml")

    assert spec.kind == "uv-project" and spec.python == ">=3.11"
    assert [name for name, _ in spec.files] == ["pyproject.toml", "uv.lock"]
    out = tmp_path / "out"
    out.mkdir()
    assert spec.write(out) == out and (out / "uv.lock").read_text() == "version = 1\n"


def test_find_in_a_bundle_follows_the_documented_order(tmp_path):
    assert find_in(tmp_path) is None
    (tmp_path / "requirements.txt").write_text("rvm-core\n")
    assert find_in(tmp_path).kind == "requirements"
    (tmp_path / "senv.json").write_bytes(_coiled(_pkg("rvm-json")))
    assert "rvm-json" in find_in(tmp_path).files[0][1]
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "uv.lock").write_text("version = 1\n")
    assert find_in(tmp_path).kind == "uv-project"
    (tmp_path / "pylock.toml").write_text('lock-version = "1.0"\n')
    assert find_in(tmp_path).kind == "pylock"


def test_canonical_bytes_round_trip():
    spec = EnvSpec("requirements", (("requirements.txt", "a\n"),), ">=3.10", ("a note",))

    again = from_bytes("x.json", to_bytes(spec))

    assert again == EnvSpec("requirements", spec.files, ">=3.10")
    assert again.digest() == spec.digest()  # notes are not part of what is installed


def test_capture_records_this_environment_pinned():
    from runner.environment.capture import capture

    spec = capture()

    lines = spec.files[0][1].splitlines()
    assert f"pytest=={version('pytest')}" in lines
    assert not any(line.startswith("prefect-vm-runner") for line in lines)
    assert spec.python == f"=={sys.version_info[0]}.{sys.version_info[1]}.*"


def test_env_push_capture_uploads_a_content_addressed_spec(tmp_path):
    pushed = subprocess.run(
        [sys.executable, "-m", "runner", "env", "push", "--capture", "--to", f"file://{tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert pushed.returncode == 0, pushed.stderr
    path = tmp_path / pushed.stdout.strip().rsplit("/", 1)[1]
    spec = from_bytes(path.name, path.read_bytes())
    assert path.name == f"{spec.digest()}.json"
    assert f"pytest=={version('pytest')}" in spec.files[0][1]
