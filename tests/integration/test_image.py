"""The container path: the runner pulls the flow run's image from a real (loopback) registry
with podman and runs the flow stage inside it, the guard staying on the host."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from devtools.images import podman_run_flags, push

STEP = "runner.steps.pull_bundle"
FLOW = """
import os
import sys

from prefect import flow


@flow(persist_result=True)
def where_am_i() -> str:
    return f"{sys.prefix} {os.path.exists('/run/.containerenv')}"
"""


@pytest.fixture
def registry_image(runner_image, registry, tmp_path):
    """The runner image in the registry only (the runner must pull it), and podman
    told that this loopback registry speaks plain HTTP."""
    reference = push(runner_image, registry, f"flows/runner:{tmp_path.name[-12:]}")
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{reference.split("/")[0]}"\ninsecure = true\n')
    yield reference, {"CONTAINERS_REGISTRIES_CONF": str(conf)}
    subprocess.run(["podman", "rmi", "--force", reference], capture_output=True, check=False)


def _bundle(runner, tmp_path) -> str:
    project = tmp_path / "project"
    project.mkdir()
    (project / "flows.py").write_text(FLOW)
    pushed = runner.cli("bundle", "push", str(project), "--to", f"file://{tmp_path}/b")
    assert pushed.returncode == 0, pushed.stderr
    return pushed.stdout.strip()


def _run_flags(runner) -> str:
    # This machine's podman needs runc and explicit ulimits (DESIGN.md); the flow's
    # result goes to the test server's local result storage, which the test reads.
    flags = [f for f in podman_run_flags() if f not in ("--network", "host")]
    storage = runner.server.env()["PREFECT_LOCAL_STORAGE_PATH"]
    Path(storage).mkdir(parents=True, exist_ok=True)
    return " ".join([*flags, "--volume", f"{storage}:{storage}"])


def test_the_flow_runs_inside_the_image_pulled_from_the_registry(
    runner, flow_run, client, registry_image, tmp_path
):
    reference, env = registry_image
    run = flow_run(
        "where_am_i",
        path=None,
        pull_steps=[{STEP: {"url": _bundle(runner, tmp_path)}}],
        job_variables={"image": reference},
    )

    result = runner.run(
        "--flow-run-id",
        str(run.id),
        "--container-run-args",
        _run_flags(runner),
        timeout=600,
        **env,
    )

    assert result.returncode == 0, result.stderr
    state = client.read_flow_run(run.id).state
    assert state.is_completed()
    assert state.result() == "/opt/runner True"  # the image's interpreter, in a container
    assert result.teardowns == ["0"]
    assert runner.written_outside_workdir() == []


def test_an_image_that_cannot_be_pulled_crashes_the_run(
    runner, flow_run, client, registry, tmp_path
):
    reference = f"{registry.host}/flows/missing:nope"
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{reference.split("/")[0]}"\ninsecure = true\n')
    run = flow_run(
        "where_am_i",
        path=None,
        pull_steps=[{STEP: {"url": _bundle(runner, tmp_path)}}],
        job_variables={"image": reference},
    )

    result = runner.run("--flow-run-id", str(run.id), CONTAINERS_REGISTRIES_CONF=str(conf))

    assert result.returncode == 3, result.stderr
    assert len(result.error_lines()) == 1 and "could not pull image" in result.error_lines()[0]
    state = client.read_flow_run(run.id).state
    assert state.is_crashed() and "could not pull image" in state.message
    assert result.teardowns == ["3"]


def test_no_podman_nor_docker_is_one_clear_line(runner, flow_run, client, tmp_path):
    run = flow_run("where_am_i", path=None, pull_steps=[{STEP: {"url": _bundle(runner, tmp_path)}}])

    result = runner.run(
        "--flow-run-id",
        str(run.id),
        "--image",
        "docker.io/library/python:3.11",
        PATH="/nonexistent",
    )

    assert result.returncode == 3, result.stderr
    assert len(result.error_lines()) == 1
    assert "neither podman nor docker" in result.error_lines()[0]
    assert client.read_flow_run(run.id).state.is_crashed()
    assert result.teardowns == ["3"]


def test_the_image_job_variable_without_podman_is_the_container_we_are_in(
    runner, flow_run, client, tmp_path
):
    # What a Docker or Kubernetes work pool looks like from inside its container.
    run = flow_run(
        "where_am_i",
        path=None,
        pull_steps=[{STEP: {"url": _bundle(runner, tmp_path)}}],
        job_variables={"image": "registry.example/team/flows:1"},
    )

    result = runner.run("--flow-run-id", str(run.id), PATH="/nonexistent")

    assert result.returncode == 0, result.stderr
    assert client.read_flow_run(run.id).state.is_completed()


def test_secrets_reach_the_container_by_name_only(runner_image, monkeypatch, tmp_path):
    from runner.environment import image
    from runner.settings import Settings

    monkeypatch.setenv("PREFECT_API_KEY", "pnu_sekret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-sekret")
    settings = Settings(
        flow_run_id="8f0e5bb0-5bb4-4b4a-9a43-4d4c3c8e1a11",
        workdir=tmp_path,
        index_url="https://robot:index-sekret@pypi.example/simple",
    )

    launch = image.prepare(
        runner_image,
        settings=settings,
        stage_file=tmp_path / "stage.json",
        extra_env={},
        say=lambda _: None,
    )

    argv, channel_fd = launch.argv, launch.channel_fd
    command = " ".join(argv)
    assert "sekret" not in command
    for name in ("PREFECT_API_KEY", "AWS_SECRET_ACCESS_KEY", "RUNNER_INDEX_URL"):
        assert f"--env {name}" in command
    assert channel_fd == image.CHANNEL_FD and "--preserve-fds 1" in command
    assert argv[-4:] == ["-m", "runner", "worker-stage", str(tmp_path / "stage.json")]
