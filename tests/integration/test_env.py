"""Software environments: the runner builds the flow's env with uv from a real (loopback)
package index, execs into it, and the flow imports what only the env has; a second run
is a cache hit; bad specs and indexes end the run Crashed with one clear line."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.server_process import free_port
from devtools.storage_servers import HttpFileServer
from devtools.wheel_index import build_index

STEP = "runner.steps.pull_bundle"
FLOW = """
from prefect import flow


@flow(persist_result=True)
def uses_env() -> str:
    import rvm_app  # noqa: F401  (only the env has it, with its whole dependency graph)
    import rvm_core

    return rvm_core.VALUE


@flow(persist_result=True)
def which_python() -> list:
    import os
    import shutil
    import sys

    venv = os.environ.get("VIRTUAL_ENV")
    return [sys.prefix == venv, shutil.which("python").startswith(sys.prefix)]
"""


@pytest.fixture(scope="session")
def index(tmp_path_factory) -> HttpFileServer:
    """The test wheels (rvm-*) as a PEP 503 index on loopback."""
    with HttpFileServer(build_index(tmp_path_factory.mktemp("index"))) as http:
        yield http


@pytest.fixture
def index_url(index) -> str:
    return f"{index.url}/simple"


def _project(tmp_path: Path, **files: str) -> Path:
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "flows.py").write_text(FLOW)
    for name, text in files.items():
        (project / name.replace("__", ".")).write_text(text)
    return project


def _cli(runner, *args: str) -> subprocess.CompletedProcess[str]:
    return runner.cli(*args)


def _bundle(runner, project: Path, tmp_path: Path) -> str:
    pushed = _cli(runner, "bundle", "push", str(project), "--to", f"file://{tmp_path}/bucket")
    assert pushed.returncode == 0, pushed.stderr
    return pushed.stdout.strip()


def _run_of(flow_run, bundle_url: str, **job_variables):
    return flow_run(
        "uses_env",
        path=None,
        pull_steps=[{STEP: {"url": bundle_url}}],
        job_variables=job_variables or None,
    )


def _logs(client, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def _envs(workdir: Path) -> list[str]:
    root = workdir / "cache" / "envs"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def test_the_flow_imports_a_package_only_its_env_has_and_the_second_run_installs_nothing(
    runner, flow_run, client, index, index_url, tmp_path
):
    url = _bundle(runner, _project(tmp_path, requirements__txt="rvm-app\nrvm-core<2\n"), tmp_path)

    first = _run_of(flow_run, url)
    result = runner.run("--flow-run-id", str(first.id), "--index-url", index_url)

    assert result.returncode == 0, result.stderr
    state = client.read_flow_run(first.id).state
    assert state.is_completed() and state.result() == "rvm-core 1.1.0"
    logs = _logs(client, first.id)
    assert "environment spec from the code bundle (requirements)" in logs
    assert "(built)" in logs
    assert len(_envs(result.workdir)) == 1
    assert runner.written_outside_workdir() == []
    assert subprocess.run([sys.executable, "-c", "import rvm_core"]).returncode != 0

    requests_before = len(index.requests)
    second = _run_of(flow_run, url)
    again = runner.run("--flow-run-id", str(second.id), "--index-url", index_url)

    assert again.returncode == 0, again.stderr
    assert client.read_flow_run(second.id).state.result() == "rvm-core 1.1.0"
    assert "cache hit, no install" in _logs(client, second.id)
    assert len(index.requests) == requests_before  # nothing was installed
    assert len(_envs(result.workdir)) == 1


def test_spec_from_senv_url_and_from_the_senv_job_variable(
    runner, flow_run, client, index_url, tmp_path
):
    url = _bundle(runner, _project(tmp_path), tmp_path)
    spec = tmp_path / "requirements.txt"
    spec.write_text("rvm-app\nrvm-plugin\n")
    pushed = _cli(runner, "env", "push", str(spec), "--to", f"file://{tmp_path}/senvs")
    assert pushed.returncode == 0, pushed.stderr
    senv_url = pushed.stdout.strip()
    assert senv_url.endswith(".json")

    by_flag = _run_of(flow_run, url)
    by_variable = _run_of(flow_run, url, senv=senv_url)
    coiled_spec = {
        "packages": [
            {"name": "rvm-app", "source": "pip", "specifier": ""},
            {"name": "rvm-yaml", "source": "pip", "specifier": "==0.9.0"},
        ]
    }
    inline = _run_of(flow_run, url, senv=coiled_spec)

    flag_run = runner.run(
        "--flow-run-id", str(by_flag.id), "--senv-url", senv_url, "--index-url", index_url
    )
    variable_run = runner.run("--flow-run-id", str(by_variable.id), "--index-url", index_url)
    inline_run = runner.run("--flow-run-id", str(inline.id), "--index-url", index_url)

    for run, result in ((by_flag, flag_run), (by_variable, variable_run), (inline, inline_run)):
        assert result.returncode == 0, result.stderr
        assert client.read_flow_run(run.id).state.result() == "rvm-core 1.1.0"
    assert "(built)" in _logs(client, by_flag.id)
    assert "cache hit" in _logs(client, by_variable.id)  # the same spec, by URL both times
    assert "from the 'senv' job variable" in _logs(client, inline.id)


def test_concurrent_runners_build_the_same_env_once(runner, flow_run, client, index_url, tmp_path):
    url = _bundle(runner, _project(tmp_path, requirements__txt="rvm-worker\nrvm-app\n"), tmp_path)
    runs = [_run_of(flow_run, url) for _ in range(2)]

    procs = [runner.start("--flow-run-id", str(r.id), "--index-url", index_url) for r in runs]
    results = [runner.finish(p, timeout=240) for p in procs]

    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    outcomes = sorted(
        "built" if "(built)" in _logs(client, r.id) else "hit"
        for r in runs
        if "cache hit, no install" in _logs(client, r.id) or "(built)" in _logs(client, r.id)
    )
    assert outcomes == ["built", "hit"]
    assert len(_envs(runner.workdir)) == 1


@pytest.mark.parametrize(
    "case", ["unresolvable package", "python mismatch", "broken index", "index credentials"]
)
def test_env_failures_crash_the_run_with_one_line(
    case, runner, flow_run, client, index, index_url, tmp_path
):
    files = {"requirements__txt": "rvm-app\n"}
    index_arg = index_url
    expect = ""
    if case == "unresolvable package":
        files = {"requirements__txt": "rvm-does-not-exist\n"}
        expect = "rvm-does-not-exist"
    elif case == "python mismatch":
        files = {
            "pyproject__toml": '[project]\nname = "p"\nversion = "0"\nrequires-python = ">=3.99"\n',
            "uv__lock": 'version = 1\nrequires-python = ">=3.99"\n',
        }
        expect = "needs Python >=3.99"
    elif case == "broken index":
        index_arg = f"http://127.0.0.1:{free_port()}/simple"
        expect = "uv failed"
    elif case == "index credentials":
        files = {"requirements__txt": "rvm-does-not-exist\n"}
        index_arg = index_url.replace("http://", "http://robot:s3cret-token@")
        expect = "rvm-does-not-exist"
    url = _bundle(runner, _project(tmp_path, **files), tmp_path)
    run = _run_of(flow_run, url)

    result = runner.run("--flow-run-id", str(run.id), "--index-url", index_arg)

    assert result.returncode == 3, result.stderr
    assert len(result.error_lines()) == 1, result.stderr
    assert expect in result.error_lines()[0]
    state = client.read_flow_run(run.id).state
    assert state.is_crashed() and expect in state.message
    assert result.teardowns == ["3"]
    assert runner.written_outside_workdir() == []
    envs = result.workdir / "cache" / "envs"
    assert envs.is_dir()  # the build ran in the env cache, and left no partial build
    assert [p.name for p in envs.glob("*.partial")] == []
    assert _envs(result.workdir) == []
    everything = result.stderr + result.stdout + _logs(client, run.id) + state.message
    assert "s3cret-token" not in everything


@pytest.mark.parametrize("case", ["unparseable json", "conda only", "index url in the spec"])
def test_a_bad_spec_named_by_the_run_crashes_it_with_exit_2(
    case, runner, flow_run, client, index_url, tmp_path
):
    """Each way a run names its spec: a senv URL (job variable), an inline Coiled spec,
    and a requirements file in the bundle."""
    files, job_variables = {}, {}
    if case == "unparseable json":
        text = b'{"packages": [{"name": "rvm-app", "source": "pip"'
        senvs = tmp_path / "senvs"
        senvs.mkdir()
        spec = senvs / f"{hashlib.sha256(text).hexdigest()}.json"
        spec.write_bytes(text)
        job_variables["senv"] = f"file://{spec}"
        expect = "is not valid JSON"
    elif case == "conda only":
        packages = [{"name": "cudatoolkit", "source": "conda", "specifier": "=11.8"}]
        job_variables["senv"] = {"packages": packages}
        expect = "no PyPI equivalent: cudatoolkit"
    else:
        files["requirements__txt"] = (
            "--index-url http://robot:s3cret-token@127.0.0.1:9/simple\nrvm-app\n"
        )
        expect = "line 1 names a package index"
    url = _bundle(runner, _project(tmp_path, **files), tmp_path)
    run = _run_of(flow_run, url, **job_variables)

    result = runner.run("--flow-run-id", str(run.id), "--index-url", index_url)

    result.assert_one_error(2, expect)
    state = client.read_flow_run(run.id).state
    assert state.is_crashed() and expect in state.message, state.message
    assert runner.written_outside_workdir() == []
    assert _envs(result.workdir) == []
    assert "s3cret-token" not in result.stderr + _logs(client, run.id) + state.message


def test_env_build_prebakes_the_cache(runner, index_url, tmp_path):
    spec = tmp_path / "requirements.txt"
    spec.write_text("rvm-yaml\n")
    workdir = tmp_path / "baked"
    argv = ["env", "build", str(spec), "--index-url", index_url, "--workdir", str(workdir)]

    cold = _cli(runner, *argv, "--json")
    warm = _cli(runner, *argv, "--json")

    assert cold.returncode == 0, cold.stderr
    cold_result, warm_result = json.loads(cold.stdout), json.loads(warm.stdout)
    assert not cold_result["cache_hit"] and warm_result["cache_hit"]
    assert cold_result["path"] == warm_result["path"]
    python = Path(cold_result["path"]) / "bin" / "python"
    imported = subprocess.run(
        [str(python), "-c", "import rvm_yaml, prefect, runner; print(rvm_yaml.VALUE)"],
        capture_output=True,
        text=True,
    )
    assert imported.stdout.strip() == "rvm-yaml 0.9.0", imported.stderr


@pytest.mark.parametrize("kind", ["uv-project", "pylock"])
def test_locked_specs_in_the_bundle(kind, runner, flow_run, client, index_url, tmp_path):
    from uv import find_uv_bin

    project = _project(tmp_path)
    (project / "pyproject.toml").write_text(
        '[project]\nname = "flowproj"\nversion = "0.1"\nrequires-python = ">=3.10"\n'
        'dependencies = ["rvm-app"]\n\n[tool.uv]\npackage = false\n'
    )
    uv_env = {**runner.env(), "UV_INDEX_URL": index_url, "UV_CACHE_DIR": str(tmp_path / "uvc")}
    subprocess.run([find_uv_bin(), "lock", "-q"], cwd=project, env=uv_env, check=True)
    if kind == "pylock":
        export = [find_uv_bin(), "export", "-q", "--frozen", "--format", "pylock.toml"]
        subprocess.run([*export, "-o", "pylock.toml"], cwd=project, env=uv_env, check=True)
        (project / "uv.lock").unlink()
        (project / "pyproject.toml").unlink()
        # A package the runner shares (Prefect's stack), at a version no index has: it
        # must be left out of the install, not fail it.
        with open(project / "pylock.toml", "a") as lock:
            lock.write('\n[[packages]]\nname = "sniffio"\nversion = "9.9.9"\n')
    run = _run_of(flow_run, _bundle(runner, project, tmp_path))

    result = runner.run("--flow-run-id", str(run.id), "--index-url", index_url)

    assert result.returncode == 0, result.stderr
    assert client.read_flow_run(run.id).state.result() == "rvm-core 1.1.0"
    assert f"environment spec from the code bundle ({kind})" in _logs(client, run.id)


def test_the_flow_sees_its_env_as_the_active_venv(runner, flow_run, client, index_url, tmp_path):
    url = _bundle(runner, _project(tmp_path, requirements__txt="rvm-json\n"), tmp_path)
    run = flow_run(
        "which_python", entrypoint="flows.py:which_python", path=None,
        pull_steps=[{STEP: {"url": url}}],
    )  # fmt: skip

    result = runner.run("--flow-run-id", str(run.id), "--index-url", index_url)

    assert result.returncode == 0, result.stderr
    assert client.read_flow_run(run.id).state.result() == [True, True]


def test_sigterm_during_the_build_stops_uv_and_reschedules_the_run(
    runner, flow_run, client, tmp_path
):
    import signal
    import socket

    import psutil

    # An index that accepts connections and never answers: uv waits on it.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    index_arg = f"http://127.0.0.1:{silent.getsockname()[1]}/simple"
    url = _bundle(runner, _project(tmp_path, requirements__txt="rvm-app\n"), tmp_path)
    run = _run_of(flow_run, url)

    proc = runner.start("--flow-run-id", str(run.id), "--index-url", index_arg)
    seen = ""
    while "installing with uv" not in seen:
        line = proc.stderr.readline()
        assert line, seen
        seen += line
    proc.send_signal(signal.SIGTERM)
    result = runner.finish(proc)
    silent.close()

    assert result.returncode == 0, seen + result.stderr
    rescheduled = client.read_flow_run(run.id)
    assert rescheduled.state.name == "AwaitingRetry", rescheduled.state
    assert rescheduled.state.message == "preempted (SIGTERM)"
    assert rescheduled.run_count == 0  # it never ran, so no retry to give back
    assert result.teardowns == ["0"]
    envs = result.workdir / "cache" / "envs"
    assert not [p for p in envs.iterdir() if p.name.endswith(".partial")]
    assert not [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if any(str(result.workdir) in part for part in p.info["cmdline"] or [])
    ]
