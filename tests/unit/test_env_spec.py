"""Environment specs: every format into one canonical form, stable digests, the conda
mapping, and one clear error per bad spec."""

from __future__ import annotations

import json
import sys
from importlib.metadata import version

import pytest

from runner.environment.spec import EnvSpec, find_in, from_bytes, load, to_bytes
from runner.errors import EnvSpecError
from tests.helpers import run_cli


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
    pushed = run_cli("env", "push", "--capture", "--to", f"file://{tmp_path}")

    assert pushed.returncode == 0, pushed.stderr
    path = tmp_path / pushed.stdout.strip().rsplit("/", 1)[1]
    spec = from_bytes(path.name, path.read_bytes())
    assert path.name == f"{spec.digest()}.json"
    assert f"pytest=={version('pytest')}" in spec.files[0][1]


def test_hashed_requirements_keep_each_hash_with_its_package():
    hashed = b"foo==1.0 \\\n    --hash=sha256:aa \\\n    --hash=sha256:bb\n    # via bar\nbar==2\n"

    spec = from_bytes("requirements.txt", hashed)

    assert spec.files[0][1].splitlines() == [
        "bar==2",
        "foo==1.0 --hash=sha256:aa --hash=sha256:bb",
    ]


def test_coiled_package_names_are_normalized_and_bad_specifiers_named():
    upper = from_bytes("a.json", _coiled(_pkg("Typing_Extensions", "==4.12")))
    lower = from_bytes("b.json", _coiled(_pkg("typing-extensions", "typing_extensions==4.12")))

    assert upper.files == lower.files == (("requirements.txt", "typing-extensions==4.12\n"),)
    with pytest.raises(EnvSpecError, match="package numpy has an invalid specifier '==not a'"):
        from_bytes("senv.json", _coiled(_pkg("numpy", "==not a")))


def test_a_uv_lock_alone_is_not_requirements(tmp_path):
    lock = tmp_path / "uv.lock"
    lock.write_text("version = 1\n")

    with pytest.raises(EnvSpecError, match="a uv project is two files"):
        from_bytes("uv.lock", lock.read_bytes())
    with pytest.raises(EnvSpecError, match="needs both pyproject.toml and uv.lock"):
        load(lock)
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    assert load(lock).kind == "uv-project"


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"kind": "requirements"}, "kind 'requirements' with files \\[\\] is not a spec"),
        ({"kind": "conda", "files": [["environment.yml", "x"]]}, "kind 'conda'"),
        ({"kind": "pylock", "files": [1]}, "'files' must be a list of \\[name, text\\] pairs"),
        (
            {"kind": "requirements", "files": [["requirements.txt", "-i https://x/simple\n"]]},
            "names a package index",
        ),
        ({"kind": "pylock", "files": [["pylock.toml", "x = 1\n"]]}, "no lock-version"),
    ],
)
def test_a_hand_written_canonical_spec_is_checked_like_any_other(document, problem):
    data = json.dumps({"format": "prefect-vm-runner/senv-1", **document}).encode()

    with pytest.raises(EnvSpecError, match=problem) as caught:
        from_bytes("senv.json", data)
    assert "senv.json" in str(caught.value)


def test_canonical_uv_project_round_trips(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nrequires-python = ">=3.10"\n')
    (tmp_path / "uv.lock").write_text("version = 1\r\n")
    spec = load(tmp_path)

    again = from_bytes(f"{spec.digest()}.json", to_bytes(spec))

    assert again == spec and again.python == ">=3.10"


def test_capture_of_a_conda_prefix_keeps_python_packages_and_drops_system_libraries(tmp_path):
    from runner.environment.capture import capture

    dist = tmp_path / "lib/python3.11/site-packages/rvm_conda_py-1.2.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rvm-conda-py\nVersion: 1.2\n")
    (tmp_path / "lib/libaws-c-common.so").write_text("")
    meta = tmp_path / "conda-meta"
    meta.mkdir()
    channel = "https://conda.anaconda.org/conda-forge/linux-64"
    for name, release, file in [
        ("rvm-conda-py", "1.2", f"{dist.relative_to(tmp_path)}/METADATA"),
        ("aws-c-common", "0.9.0", "lib/libaws-c-common.so"),
    ]:
        record = {"name": name, "version": release, "subdir": "linux-64", "files": [file]}
        (meta / f"{name}.json").write_text(json.dumps({**record, "channel": channel}))

    spec = capture(prefix=tmp_path)

    lines = spec.files[0][1].splitlines()
    assert "rvm-conda-py==1.2" in lines
    assert not any(line.startswith("aws-c-common") for line in lines)
    assert any("not captured: aws-c-common" in note for note in spec.notes)


def test_nvidia_python_bindings_are_not_taken_for_the_conda_cuda_toolkit():
    spec = from_bytes("senv.json", _coiled(_pkg("cuda-python", "==12.6", source="conda")))

    assert spec.files[0][1] == "cuda-python==12.6\n"
    with pytest.raises(EnvSpecError, match="no PyPI equivalent: cuda-nvcc"):
        from_bytes("senv.json", _coiled(_pkg("cuda-nvcc", "", source="conda")))
