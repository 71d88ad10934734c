"""Shared fixtures: a real Prefect server for the session, deployments, and a runner launcher."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Keep Prefect (imported below and by the runner) away from the real ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-test-home-"))

import pytest  # noqa: E402

from devtools.prefect_server import PrefectServer  # noqa: E402
from devtools.storage_servers import MotoServer  # noqa: E402
from tests.helpers import run_cli  # noqa: E402
from tests.planted import SECRET_ENV, record  # noqa: E402

# Planted secrets: tests/integration/test_secrets.py checks at the end of the session that
# none of them came out anywhere.
os.environ.update(SECRET_ENV)

REPO = Path(__file__).resolve().parent.parent
FLOWS_DIR = Path(__file__).resolve().parent / "flows"


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[PrefectServer]:
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with (
        PrefectServer() as server,
        temporary_settings(
            updates={
                PREFECT_API_URL: server.api_url,
                PREFECT_LOCAL_STORAGE_PATH: server.env()["PREFECT_LOCAL_STORAGE_PATH"],
            }
        ),
    ):
        yield server


# S3 servers are shared by the storage suite and the end-to-end tests.
BUCKET = "conformance"  # the one bucket/container each storage server gets


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def vm_image() -> str:
    """The runner's VM image: images/provision/*.sh run into a Debian rootfs with systemd
    (devtools.vm_image; a cold build takes minutes, then it is cached by content)."""
    from devtools.vm_image import CACHE_DIR, build_vm_image
    from tests.helpers import require_containers

    require_containers("mmdebstrap", "journalctl")
    return build_vm_image(REPO, cache_dir=CACHE_DIR)


@pytest.fixture(scope="session")
def bundle_url(moto) -> str:
    """tests/flows pushed as a bundle to a fresh bucket of the session's moto."""
    bucket = f"vm-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(bucket)
    pushed = run_cli(
        "bundle", "push", str(FLOWS_DIR), "--to", f"s3://{bucket}/flows",
        env={**os.environ, **moto.env()},
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    return pushed.stdout.strip()


@pytest.fixture(scope="session")
def moto_iam() -> Iterator[MotoServer]:
    """A moto server that refuses every request not signed by an IAM user it knows."""
    with MotoServer(enforce_iam=True) as server:
        yield server


@pytest.fixture(scope="session")
def client(prefect_server: PrefectServer):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        yield client


@pytest.fixture
def flow_run(client):
    """``flow_run("hello", n=3)``: a new Scheduled flow run of a deployment of tests/flows.

    By default the deployment's code is the local directory tests/flows; pass
    ``pull_steps`` (and ``path=None``) for code that comes from a bundle, and
    ``job_variables`` for the run's own."""

    def create(
        flow_name: str,
        *,
        entrypoint: str | None = None,
        path: str | None = str(FLOWS_DIR),
        pull_steps: list[dict] | None = None,
        job_variables: dict | None = None,
        **parameters: object,
    ):
        flow_id = client.create_flow_from_name(flow_name.replace("_", "-"))
        deployment_id = client.create_deployment(
            flow_id=flow_id,
            name=f"test-{uuid.uuid4().hex[:8]}",
            entrypoint=entrypoint or f"flows.py:{flow_name}",
            path=path,
            pull_steps=pull_steps,
        )
        return client.create_flow_run_from_deployment(
            deployment_id, parameters=parameters, job_variables=job_variables
        )

    return create


@dataclass
class RunnerResult:
    returncode: int
    stdout: str
    stderr: str
    teardowns: list[str]  # one RUNNER_EXIT_CODE per teardown that happened
    workdir: Path

    def error_lines(self) -> list[str]:
        """The runner's own error lines (Prefect's console lines for the flow run excluded)."""
        return [
            line for line in self.stderr.splitlines() if " runner[" in line and " ERROR " in line
        ]

    def assert_one_error(self, code: int, says: str) -> str:
        """The runner ended with ``code``, one error line that says ``says``, and one
        teardown; returns the line."""
        assert self.returncode == code, self.stderr
        lines = self.error_lines()
        assert len(lines) == 1 and says in lines[0], self.stderr
        assert self.teardowns == [str(code)]
        return lines[0]


class Runner:
    """Starts `python -m runner` as users do, with teardown recorded to a file."""

    def __init__(self, server: PrefectServer, tmp_path: Path) -> None:
        self.server = server
        self.tmp_path = tmp_path
        self.workdir = tmp_path / "work"
        self.teardown_log = tmp_path / "teardown.log"
        self.home = tmp_path / "home"
        self.home.mkdir()

    def env(self, **overrides: str) -> dict[str, str]:
        # HOME and PREFECT_HOME point at an empty directory, so that a test can
        # check that the runner wrote nothing outside its workdir. No cloud metadata: on
        # a cloud machine the runner would ask the real service (tests that want one
        # pass --cloud and a loopback stand-in).
        env = {
            **os.environ,
            **self.server.env(),
            "HOME": str(self.home),
            "PREFECT_HOME": str(self.home / ".prefect"),
            "RUNNER_CLOUD": "none",
        }
        env.update(overrides)
        return {k: v for k, v in env.items() if v != ""}

    def argv(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "runner",
            *args,
            "--workdir",
            str(self.workdir),
            "--on-exit",
            "command",
            "--on-exit-command",
            f'echo "$RUNNER_EXIT_CODE" >> {self.teardown_log}',
        ]

    def written_outside_workdir(self) -> list[Path]:
        """Files under HOME (Prefect itself creates an empty PREFECT_HOME on import)."""
        return sorted(p for p in self.home.rglob("*") if not p.is_dir())

    def start(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            env=self.env(**env),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(self, proc: subprocess.Popen[str], timeout: float = 120) -> RunnerResult:
        stdout, stderr = proc.communicate(timeout=timeout)
        record(stdout, stderr)
        teardowns = self.teardown_log.read_text().split() if self.teardown_log.exists() else []
        return RunnerResult(proc.returncode, stdout, stderr, teardowns, self.workdir)

    def run(self, *args: str, timeout: float = 120, **env: str) -> RunnerResult:
        return self.finish(self.start(*args, **env), timeout=timeout)

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Another command (``bundle push``, ``env build``...) with this runner's environment."""
        return run_cli(*args, env=self.env(**env))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``last`` (the check over the whole session's output) run last."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Every test's captured output goes into the transcript the secrets check reads."""
    if report.when == "teardown":  # by then the report holds every phase's sections
        record(*(content for _, content in report.sections))
    record(report.longreprtext)


@pytest.fixture
def runner(prefect_server: PrefectServer, tmp_path: Path) -> Runner:
    return Runner(prefect_server, tmp_path)
