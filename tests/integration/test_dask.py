"""Flows that outgrow one VM: a DaskTaskRunner on a LocalCluster of worker processes runs
under the runner, in the runner's own environment and in an env built from PyPI, and
leaves no Dask process behind; a flow that asks Coiled for a cluster reaches Coiled's API
(a loopback stand-in) with the credentials the runner was given, and the token stays out
of everything the runner writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from tests.conftest import FLOWS_DIR
from tests.helpers import IN_CI
from tests.planted import planted

PYPI = "https://pypi.org/simple"
STEP = "runner.steps.pull_bundle"
# In the runner's environment only: every process it starts inherits it, so that a
# leftover is found even after it was reparented away from the runner.
MARKER = "RVM_DASK_TEST_MARKER"


def _logs(client, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def _task_runs(client, flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    )


class Family:
    """Every process descended from the runner while it runs (polled in a thread, so that
    the test can read the runner's pipes meanwhile)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.seen: dict[tuple[int, float], str] = {}  # (pid, start time) -> command line
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                children = self.root.children(recursive=True)
            except psutil.Error:  # the runner has exited
                return
            for child in children:
                with contextlib.suppress(psutil.Error):  # it ended while we looked
                    self.seen.setdefault(
                        (child.pid, child.create_time()), " ".join(child.cmdline())
                    )
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def kill(self) -> None:
        """After a failure: SIGKILL the runner and everything seen under it (its worker
        outlives the guard), so that a failed test leaves nothing running."""
        with contextlib.suppress(psutil.Error):
            self.root.kill()
        for pid, started in self.seen:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.create_time() == started:
                    proc.kill()

    def pids(self) -> set[int]:
        return {pid for pid, _ in self.seen}

    def survivors(self, marker: str, grace: float = 5) -> list[str]:
        """The runner's descendants still running, and any process with the run's marker
        in its environment (orphans reparented to init), as "pid cmdline". Processes that
        end on their own once their parent is gone (multiprocessing's resource tracker
        reads EOF on its pipe) get ``grace`` seconds; zombies waiting for init to reap
        them have ended."""
        deadline = time.monotonic() + grace
        while (alive := self._running(marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return alive

    def _running(self, marker: str) -> list[str]:
        found = {}
        for (pid, started), cmdline in self.seen.items():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                    found[pid] = cmdline
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            with contextlib.suppress(psutil.Error):  # gone, or not ours to read
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if proc.environ().get(MARKER) == marker:
                    found[proc.pid] = " ".join(proc.info["cmdline"] or [])
        return sorted(f"{pid} {cmdline}" for pid, cmdline in found.items())


def _require_pypi() -> None:
    """The one test that reaches past loopback: skip it, with one line, where PyPI cannot
    be reached (in CI, fail instead, so that it never goes missing there)."""
    import ssl

    import httpx

    # The system's CA store, as uv's (UV_SYSTEM_CERTS) and pip's: PyPI may be reached
    # through a TLS-inspecting proxy whose CA only the system knows.
    system_cas = ssl.create_default_context()
    try:
        httpx.head(
            f"{PYPI}/prefect-dask/", timeout=10, follow_redirects=True, verify=system_cas
        ).raise_for_status()
    except httpx.HTTPError as exc:
        why = f"PyPI is not reachable ({exc.__class__.__name__}): the env cannot be built"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)


def _run_watched(runner, flow_run_id, *args: str, timeout: float = 120, **env: str):
    marker = uuid.uuid4().hex
    proc = runner.start("--flow-run-id", str(flow_run_id), *args, **{MARKER: marker}, **env)
    family = Family(proc.pid)
    try:
        result = runner.finish(proc, timeout=timeout)
    finally:
        family.stop()
        if proc.poll() is None:
            family.kill()
    return result, family, marker


def _assert_ran_on_dask_workers(outcome: dict, family: Family, n: int) -> None:
    assert outcome["squares"] == [i * i for i in range(n)]
    task_pids = set(outcome["task_pids"])
    assert len(task_pids) == 2, outcome  # both worker processes got tasks
    assert outcome["flow_pid"] not in task_pids
    assert outcome["flow_pid"] in family.pids()  # the flow ran in the runner's worker...
    assert task_pids <= family.pids()  # ...and the tasks in processes the run started


def test_a_dask_task_runner_flow_runs_in_the_runners_own_environment(runner, flow_run, client):
    run = flow_run("dask_squares", entrypoint="dask_flows.py:dask_squares", n=6)

    result, family, marker = _run_watched(runner, run.id)

    assert result.returncode == 0, result.stderr
    assert result.teardowns == ["0"]
    state = client.read_flow_run(run.id).state
    assert state.is_completed(), state
    outcome = state.result()
    _assert_ran_on_dask_workers(outcome, family, 6)
    tasks = _task_runs(client, run.id)
    assert len(tasks) == 6 and all(task.state.is_completed() for task in tasks), tasks
    assert family.survivors(marker) == []
    assert runner.written_outside_workdir() == []


@pytest.mark.timeout(600)
def test_a_dask_task_runner_flow_runs_in_an_env_built_from_pypi(runner, flow_run, client, tmp_path):
    """The env (prefect-dask, distributed, dask: from PyPI) is built for the run; the flow
    and the Dask worker processes it spawns both run the env's interpreter and packages."""
    _require_pypi()
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(FLOWS_DIR / "dask_flows.py", project)
    (project / "requirements.txt").write_text("prefect-dask>=0.3,<1\n")
    pushed = runner.cli("bundle", "push", str(project), "--to", f"file://{tmp_path}/bucket")
    assert pushed.returncode == 0, pushed.stderr
    run = flow_run(
        "dask_squares", entrypoint="dask_flows.py:dask_squares", path=None,
        pull_steps=[{STEP: {"url": pushed.stdout.strip()}}], n=6,
    )  # fmt: skip

    result, family, marker = _run_watched(runner, run.id, "--index-url", PYPI, timeout=480)

    assert result.returncode == 0, result.stderr
    assert result.teardowns == ["0"]
    state = client.read_flow_run(run.id).state
    assert state.is_completed(), state
    logs = _logs(client, run.id)
    assert "environment spec from the code bundle (requirements)" in logs
    assert "(built)" in logs
    outcome = state.result()
    _assert_ran_on_dask_workers(outcome, family, 6)
    env_root = outcome["prefix"]
    assert Path(env_root).is_relative_to(result.workdir / "cache" / "envs"), env_root
    assert outcome["task_prefixes"] == [env_root]  # the spawned workers run the env too
    for name, path in outcome["modules"].items():  # the env's own copies, not the runner's
        assert Path(path).is_relative_to(env_root), (name, path)
    assert family.survivors(marker) == []


def _wait_for_running_tasks(client, flow_run_id, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [task.state for task in _task_runs(client, flow_run_id)]
        if sum(state is not None and state.is_running() for state in states) >= count:
            return
        time.sleep(0.3)
    raise AssertionError(f"{count} task runs were not running within {timeout}s")


@pytest.mark.parametrize("stop", ["preempted", "worker killed"])
def test_a_run_stopped_while_dask_workers_compute_leaves_no_process_behind(
    stop, runner, flow_run, client
):
    """A preemption (SIGTERM to the runner) and a worker killed outright (as the OOM killer
    would) while both Dask workers are inside a task: the run ends as it should, and the
    cluster's processes end with it."""
    run = flow_run("dask_squares", entrypoint="dask_flows.py:dask_squares", n=4, pause=120)
    marker = uuid.uuid4().hex
    proc = runner.start("--flow-run-id", str(run.id), **{MARKER: marker})
    family = Family(proc.pid)
    try:
        _wait_for_running_tasks(client, run.id, 2)
        if stop == "preempted":
            proc.send_signal(signal.SIGTERM)
        else:
            (worker,) = [pid for (pid, _), cmd in family.seen.items() if "-m runner" in cmd]
            os.kill(worker, signal.SIGKILL)
        result = runner.finish(proc)
    finally:
        family.stop()
        if proc.poll() is None:
            family.kill()

    state = client.read_flow_run(run.id).state
    if stop == "preempted":
        assert result.returncode == 0, result.stderr
        assert state.name == "AwaitingRetry" and state.message == "preempted (SIGTERM)", state
    else:
        assert result.returncode == 5, result.stderr
        assert state.is_crashed() and "killed by SIGKILL" in state.message, state
    assert result.teardowns == [str(result.returncode)]
    assert sum("spawn_main" in cmd for cmd in family.seen.values()) == 2  # the Dask workers
    assert family.survivors(marker) == []


class CoiledStandIn:
    """Coiled's API on loopback: records each request (method, path, Authorization) and
    answers every one with an error, as a Coiled that refuses to start anything would."""

    MESSAGE = "stub Coiled API: no clusters here"

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                stand_in.requests.append(
                    (self.command, self.path, self.headers.get("Authorization"))
                )
                body = json.dumps({"message": CoiledStandIn.MESSAGE}).encode()
                self.send_response(500)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

            def log_message(self, *args: object) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> CoiledStandIn:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def coiled_api() -> Iterator[CoiledStandIn]:
    with CoiledStandIn() as server:
        yield server


@pytest.mark.parametrize(
    ("flow_name", "given_in"),
    [
        ("coiled_cluster", "environment"),
        ("coiled_function", "environment"),
        ("coiled_cluster", "user-data"),  # as a vm worker's `env` job variable gets there
    ],
)
def test_a_flow_reaches_coiled_with_the_credentials_the_runner_was_given(
    flow_name, given_in, runner, flow_run, client, coiled_api, tmp_path
):
    token = planted("coiled-token")  # the session's last test looks for it everywhere
    run = flow_run(flow_name, entrypoint=f"dask_flows.py:{flow_name}")
    coiled = {"DASK_COILED__SERVER": coiled_api.url, "DASK_COILED__TOKEN": token}

    if given_in == "environment":
        result = runner.run("--flow-run-id", str(run.id), **coiled)
    else:
        user_data = tmp_path / "user-data.env"
        lines = {"RUNNER_FLOW_RUN_ID": str(run.id), **coiled}
        user_data.write_text("".join(f"{key}={value}\n" for key, value in lines.items()))
        result = runner.run("--user-data-file", str(user_data))

    assert coiled_api.requests, result.stderr
    method, path, authorization = coiled_api.requests[0]
    assert (method, path) == ("GET", "/api/v2/user/me")
    assert authorization == f"ApiToken {token}"  # Coiled's header for a token with a "-"
    assert all(auth == authorization for _, _, auth in coiled_api.requests)
    # Coiled refused, so the flow raised its error: the run is Failed (a flow error).
    assert result.returncode == 1, result.stderr
    assert result.teardowns == ["1"]
    state = client.read_flow_run(run.id).state
    assert state.is_failed(), state
    assert CoiledStandIn.MESSAGE in state.message
    logs = _logs(client, run.id)
    assert CoiledStandIn.MESSAGE in logs
    for text in (result.stdout, result.stderr, logs, state.message):
        assert token not in text
