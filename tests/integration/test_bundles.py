"""Flow code from a bucket: `bundle push`, then the runner pulls, verifies, extracts and runs it;
every bad bundle ends the run Crashed with one clear line."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner.storage import resolve
from tests.conftest import FLOWS_DIR
from tests.helpers import compression_bomb, crafted_bundle

STEP = "runner.steps.pull_bundle"


@dataclass
class Store:
    """A bucket prefix the tests push to, and the environment that reaches it."""

    url: str
    env: dict[str, str]

    def put(self, path: Path, name: str | None = None) -> str:
        url = f"{self.url}/{name or path.name}"
        storage, key = resolve(url)
        storage.upload(path, key)
        return url


@pytest.fixture
def store(moto, monkeypatch) -> Store:
    """A fresh bucket on the session's S3 server (moto); this process reaches it too."""
    bucket = f"flows-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(bucket)
    for name, value in moto.env().items():
        monkeypatch.setenv(name, value)
    return Store(url=f"s3://{bucket}/flows", env=moto.env())


@pytest.fixture
def local_store(tmp_path) -> Store:
    return Store(url=f"file://{tmp_path / 'bucket'}/flows", env={})


def _read(url: str) -> bytes:
    storage, key = resolve(url)
    return storage.read_range(key, 0, storage.size(key))


def _push(runner, store: Store, source: Path = FLOWS_DIR) -> subprocess.CompletedProcess[str]:
    return runner.cli("bundle", "push", str(source), "--to", store.url, **store.env)


def _logs(client, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def test_push_prints_a_content_addressed_url_and_skips_a_second_upload(runner, store):
    first = _push(runner, store)
    second = _push(runner, store)

    assert first.returncode == 0, first.stderr
    url = first.stdout.strip()
    digest = url.rsplit("/", 1)[1].removesuffix(".tar.gz")
    assert hashlib.sha256(_read(url)).hexdigest() == digest
    assert second.stdout.strip() == url and "already" in second.stderr


def test_runner_pulls_the_bundle_and_runs_the_flow(runner, store, flow_run, client):
    url = _push(runner, store).stdout.strip()
    run = flow_run("hello", n=21, path=None, pull_steps=[{STEP: {"url": url}}])

    result = runner.run("--flow-run-id", str(run.id), "--keep-workdir", **store.env)

    assert result.returncode == 0, result.stderr
    state = client.read_flow_run(run.id).state
    assert state.is_completed() and state.result() == 42
    logs = _logs(client, run.id)
    assert "sha256 verified" in logs and "downloaded" in logs
    code_dir = result.workdir / "runs" / str(run.id) / "code"
    assert (code_dir / "flows.py").is_file()
    assert (result.workdir / "cache" / "bundles" / url.rsplit("/", 1)[1]).is_file()
    assert runner.written_outside_workdir() == []

    again = flow_run("hello", n=1, path=None, pull_steps=[{STEP: {"url": url}}])
    assert runner.run("--flow-run-id", str(again.id), **store.env).returncode == 0
    assert "cache hit" in _logs(client, again.id)


def test_bundle_from_a_local_path(runner, local_store, flow_run, client):
    url = _push(runner, local_store).stdout.strip()
    run = flow_run("hello", n=4, path=None, pull_steps=[{STEP: {"url": url}}])

    assert runner.run("--flow-run-id", str(run.id)).returncode == 0
    assert client.read_flow_run(run.id).state.result() == 8


def test_code_url_flag_and_job_variable_win_over_the_pull_step(runner, store, flow_run, client):
    url = _push(runner, store).stdout.strip()
    broken_step = [{STEP: {"url": f"{store.url}/{'0' * 64}.tar.gz"}}]

    by_flag = flow_run("hello", path=None, pull_steps=broken_step)
    by_job_variable = flow_run(
        "hello", path=None, pull_steps=broken_step, job_variables={"code_url": url}
    )

    assert (
        runner.run("--flow-run-id", str(by_flag.id), "--code-url", url, **store.env).returncode == 0
    )
    assert runner.run("--flow-run-id", str(by_job_variable.id), **store.env).returncode == 0
    assert client.read_flow_run(by_job_variable.id).state.is_completed()


def _bad_bundle(case: str, store: Store, tmp_path: Path, good_url: str) -> tuple[str, list[str]]:
    """The URL (and extra runner flags) for each kind of bad input."""
    local = tmp_path / "crafted"
    local.mkdir(exist_ok=True)
    if case == "missing object":
        return f"{store.url}/{'0' * 64}.tar.gz", []
    if case == "digest mismatch":
        copy = local / "copy.tar.gz"
        copy.write_bytes(_read(good_url))
        return store.put(copy, f"{'1' * 64}.tar.gz"), []
    if case == "corrupt archive":
        garbage = local / "garbage"
        garbage.write_bytes(b"definitely not gzip" * 50)
        return store.put(garbage, f"{hashlib.sha256(garbage.read_bytes()).hexdigest()}.tar.gz"), []
    if case == "truncated archive":
        data = _read(good_url)
        cut = local / "cut"
        cut.write_bytes(data[: len(data) // 2])
        return store.put(cut, f"{hashlib.sha256(cut.read_bytes()).hexdigest()}.tar.gz"), []
    if case == "path traversal":
        return store.put(
            crafted_bundle(local, ("flows.py", "file", ""), ("../evil.py", "file", "x"))
        ), []
    if case == "link escape":
        return store.put(
            crafted_bundle(local, ("flows.py", "file", ""), ("data", "symlink", "../../../../etc"))
        ), []
    if case == "oversize":
        return good_url, ["--max-bundle-bytes", "100"]
    if case == "runner shadowing":
        return store.put(crafted_bundle(local, ("runner/__init__.py", "file", ""))), []
    if case == "unknown scheme":
        return f"ftp://example.invalid/flows/{'2' * 64}.tar.gz", []
    if case == "missing bucket":
        return f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/flows/{'3' * 64}.tar.gz", []
    if case == "sdk not installed":
        return f"gs://flows/{'4' * 64}.tar.gz", []
    if case == "no digest":
        return f"{store.url}/code.tar.gz", []
    raise AssertionError(case)


def _without_google_cloud_storage(tmp_path: Path) -> Path:
    """A sitecustomize that makes `import google.cloud.storage` fail, as on an image
    installed without the [gcs] extra."""
    site = tmp_path / "no-gcs"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nsys.modules['google.cloud.storage'] = None\n"
    )
    return site


def test_access_denied_crashes_the_run(runner, moto_iam, flow_run, client):
    url = f"s3://locked/flows/{'5' * 64}.tar.gz"
    run = flow_run("hello", path=None, pull_steps=[{STEP: {"url": url}}])

    result = runner.run("--flow-run-id", str(run.id), **moto_iam.env())

    assert result.returncode == 3
    state = client.read_flow_run(run.id).state
    assert state.is_crashed() and "denied" in state.message.lower(), state.message
    assert len(result.error_lines()) == 1
    assert moto_iam.env()["AWS_SECRET_ACCESS_KEY"] not in result.stderr + state.message
    assert result.teardowns == ["3"]


@pytest.mark.parametrize(
    ("case", "exit_code", "says"),
    [
        ("missing object", 3, "0000000000"),
        ("digest mismatch", 3, "digest mismatch"),
        ("corrupt archive", 3, "corrupt or truncated"),
        ("truncated archive", 3, "corrupt or truncated"),
        ("path traversal", 3, "'../evil.py' is unsafe"),
        ("link escape", 3, "'data' is unsafe"),
        ("oversize", 3, "expands to more than 100 bytes"),
        ("runner shadowing", 3, "rename it"),
        ("unknown scheme", 2, "unsupported storage URL scheme 'ftp://'"),
        ("no digest", 2, "names no digest"),
        ("missing bucket", 3, "does not exist"),
        ("sdk not installed", 2, "pip install 'prefect-vm-runner[gcs]'"),
    ],
)
def test_bad_bundles_crash_the_run_with_one_clear_line(
    runner, store, flow_run, client, tmp_path, case, exit_code, says
):
    good_url = _push(runner, store).stdout.strip()
    url, flags = _bad_bundle(case, store, tmp_path, good_url)
    run = flow_run("hello", path=None, pull_steps=[{STEP: {"url": url}}])
    env = dict(store.env)
    if case == "sdk not installed":
        env["PYTHONPATH"] = str(_without_google_cloud_storage(tmp_path))

    result = runner.run("--flow-run-id", str(run.id), *flags, **env)

    assert result.returncode == exit_code, result.stderr
    state = client.read_flow_run(run.id).state
    assert state.is_crashed() and says in state.message, state.message
    errors = result.error_lines()
    assert len(errors) == 1 and says in errors[0], result.stderr
    assert result.teardowns == [str(exit_code)]
    assert runner.written_outside_workdir() == []
    run_dir = result.workdir / "runs" / str(run.id)
    assert not (run_dir / "code").exists() and not (run_dir / "code.partial").exists()
    assert (
        not (tmp_path / "evil.py").exists() and not (result.workdir / "runs" / "evil.py").exists()
    )


class _PeakSize:
    """Samples the bytes under a directory in a thread: the most it held while it ran."""

    def __init__(self, root: Path) -> None:
        self.root, self.peak = root, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> _PeakSize:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            total = 0
            for path in self.root.rglob("*"):
                with contextlib.suppress(OSError):
                    total += path.lstat().st_size if path.is_file() else 0
            self.peak = max(self.peak, total)


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        # 160 members of 64 MiB of zeros: each passes the limit alone, their sum does not.
        ("members", "expands to more than 209715200 bytes (stopped at 'blob-0003')"),
        # One pax header that claims 10 GiB, which tarfile would read whole into memory.
        ("pax header", "inflates past what its members account for (refused at 512 of"),
    ],
)
def test_a_compression_bomb_is_refused_as_it_inflates(
    runner, flow_run, client, tmp_path, kind, says
):
    limit = 200 * 1024**2
    bomb = compression_bomb(
        _mkdir(tmp_path / "bucket"), members=160, member_bytes=64 * 1024**2, pax=kind != "members"
    )
    assert bomb.stat().st_size < 16 * 1024**2  # a few MB that expand to 10 GiB
    run = flow_run("hello", path=None)
    runs = runner.workdir / "runs"

    with _PeakSize(runs) as disk:
        result = runner.run(
            "--flow-run-id", str(run.id), "--code-url", f"file://{bomb}",
            "--max-bundle-bytes", str(limit),
        )  # fmt: skip

    result.assert_one_error(3, says)
    state = client.read_flow_run(run.id).state
    assert state.is_crashed() and says in state.message, state.message
    assert disk.peak < limit  # what reached the disk before it was refused
    assert runner.written_outside_workdir() == []
    run_dir = runs / str(run.id)
    assert not (run_dir / "code").exists() and not (run_dir / "code.partial").exists()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_other_pull_steps_run_after_the_bundle(runner, store, flow_run, client, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(FLOWS_DIR, project / "flows_pkg")
    url = _push(runner, store, project).stdout.strip()
    steps = [
        {STEP: {"url": url}},
        {"prefect.deployments.steps.set_working_directory": {"directory": "flows_pkg"}},
    ]
    run = flow_run("hello", n=5, path=None, pull_steps=steps)

    result = runner.run("--flow-run-id", str(run.id), **store.env)

    assert result.returncode == 0, result.stderr
    assert client.read_flow_run(run.id).state.result() == 10


def test_presigned_https_bundle_survives_transient_errors(runner, flow_run, client, tmp_path):
    from devtools.storage_servers import HttpFileServer

    with HttpFileServer(tmp_path / "www") as server:
        (tmp_path / "www").mkdir(exist_ok=True)
        built = crafted_bundle(
            tmp_path / "www", ("flows.py", "file", (FLOWS_DIR / "flows.py").read_text())
        )
        url = f"{server.url}/{built.name}?X-Amz-Signature=not-a-real-one"
        server.fail(503, times=2)  # the first two requests get "Service Unavailable"
        run = flow_run("hello", n=6, path=None, pull_steps=[{STEP: {"url": url}}])

        result = runner.run("--flow-run-id", str(run.id))

    assert result.returncode == 0, result.stderr
    assert client.read_flow_run(run.id).state.result() == 12
    assert "retry 1 of" in result.stderr and "not-a-real-one" not in result.stderr
    assert "not-a-real-one" not in _logs(client, run.id)


def test_prefect_step_runner_runs_push_and_pull_steps(
    prefect_server, local_store, tmp_path, monkeypatch
):
    """The steps as `prefect deploy` and Prefect's own workers run them, templating included."""
    from prefect.deployments.steps.core import run_steps
    from prefect.utilities.asyncutils import run_coro_as_sync

    monkeypatch.setenv("RUNNER_WORKDIR", str(tmp_path / "work"))
    monkeypatch.chdir(tmp_path)
    push = [
        {
            "runner.steps.push_bundle": {
                "id": "bundle",
                "path": str(FLOWS_DIR),
                "to": local_store.url,
            }
        }
    ]
    pushed = run_coro_as_sync(run_steps(push))
    pull = [{"runner.steps.pull_bundle": {"url": "{{ bundle.url }}"}}]

    pulled = run_coro_as_sync(run_steps(pull, upstream_outputs=pushed))

    assert pushed["bundle"]["url"].endswith(f"{pushed['bundle']['sha256']}.tar.gz")
    assert (Path(pulled["directory"]) / "flows.py").read_text() == (
        FLOWS_DIR / "flows.py"
    ).read_text()
    assert Path(pulled["directory"]) == tmp_path / "code"
