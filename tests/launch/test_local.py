"""The whole loop on the local provider: a deployment run in a vm pool gets a VM (the runner's
image booted by podman), the runner in it runs the flow and powers it off, and the worker
leaves no VM behind, whatever the run did."""

from __future__ import annotations

import time

from prefect.states import Cancelling

from devtools.fault_proxy import FaultProxy
from tests.helpers import unused_api_url
from tests.launch.conftest import LocalPool


def test_a_run_gets_a_vm_that_runs_it_and_nothing_is_left(pool):
    pool.start_worker()
    run = pool.run("hello", n=4)

    ended = pool.wait_final(run.id)

    assert ended.state.is_completed(), ended.state
    assert ended.infrastructure_pid and ended.infrastructure_pid.startswith("prefect-vm-")
    assert pool.wait_no_vms() == []
    # the worker logs the delete once podman has answered, a moment after the VM is gone
    pool.wait_for_log(f"VM {ended.infrastructure_pid} deleted")
    assert f"VM {ended.infrastructure_pid} started" in pool.worker_log()


def test_a_failing_flow_ends_failed_and_its_vm_is_gone(pool):
    pool.start_worker()
    run = pool.run("fails")

    ended = pool.wait_final(run.id)

    assert ended.state.is_failed(), ended.state
    assert pool.wait_no_vms() == []


def test_a_cancel_ends_the_run_cancelled_and_its_vm_is_gone(pool, client):
    pool.start_worker()
    run = pool.run("numbered_logs", count=120, pause=1.0)
    pool.wait_state(run.id, "RUNNING")

    client.set_flow_run_state(run.id, Cancelling(), force=True)
    ended = pool.wait_final(run.id)

    assert ended.state.is_cancelled(), ended.state
    assert pool.wait_no_vms() == []


def test_the_sweep_removes_what_a_killed_worker_left(pool, client):
    pool.start_worker()
    run = pool.run("numbered_logs", count=6, pause=1.0)
    pool.wait_state(run.id, "RUNNING")
    pool.kill_worker()  # the VM goes on, and powers off with nobody to delete it

    ended = pool.wait_final(run.id)
    assert ended.state.is_completed(), ended.state
    deadline = time.monotonic() + 60
    while pool.vm_states() != {ended.infrastructure_pid: "exited"}:  # powered off, not gone
        assert time.monotonic() < deadline, pool.vm_states()
        time.sleep(0.5)
    pool.start_worker()  # a worker sweeps its pool as it starts

    assert pool.wait_no_vms(timeout=90) == []
    assert "sweep: deleting VM" in pool.worker_log()


def test_two_runs_at_once_get_two_vms_and_both_are_gone(pool):
    pool.start_worker()
    runs = [pool.run("hello", n=n) for n in (5, 6)]

    ended = [pool.wait_final(run.id) for run in runs]

    assert all(run.state.is_completed() for run in ended), [r.state for r in ended]
    assert len({run.infrastructure_pid for run in ended}) == 2
    assert pool.wait_no_vms() == []


def test_an_unknown_provider_crashes_the_run_with_one_line_and_creates_nothing(pool):
    pool.start_worker()
    run = pool.run("hello", job_variables={"provider": "mainframe"})

    ended = pool.wait_final(run.id, timeout=60)

    assert ended.state.is_crashed()
    assert ended.state.message == (
        "could not start a VM: unknown VM provider 'mainframe'; the provider job variable "
        "takes one of: aws, azure, gcp, local"
    )
    assert pool.vms() == []


def test_an_image_that_does_not_exist_crashes_the_run_and_creates_nothing(pool):
    pool.start_worker()
    run = pool.run("hello", job_variables={"machine_image": "localhost/no-such-vm-image:1"})

    ended = pool.wait_final(run.id, timeout=60)

    assert ended.state.is_crashed()
    assert ended.state.message.startswith("could not start a VM: creating VM prefect-vm-")
    assert "the image does not exist here" in ended.state.message
    assert pool.vms() == []


def _unreachable_api(api_wait: str) -> dict[str, str]:
    """A VM whose runner cannot reach the API (the env job variable wins in user-data)."""
    return {"PREFECT_API_URL": unused_api_url(), "RUNNER_API_WAIT": api_wait,
            "RUNNER_CLOUD": "none"}  # fmt: skip


def test_a_vm_that_never_claims_its_run_is_deleted_and_the_run_crashes(pool):
    pool.start_worker()
    run = pool.run("hello", job_variables={"env": _unreachable_api("300"), "claim_timeout": 15})

    ended = pool.wait_final(run.id, timeout=120)

    assert ended.state.is_crashed()
    message = ended.state.message
    assert message.startswith(f"VM {ended.infrastructure_pid} did not claim the run within 15s")
    assert "Its boot output ended with:" in message and "(no boot output)" not in message
    assert pool.wait_no_vms() == []


def test_a_vm_that_stops_before_its_run_ends_crashes_the_run_with_its_console(pool):
    pool.start_worker()
    run = pool.run("hello", job_variables={"env": _unreachable_api("2")})

    ended = pool.wait_final(run.id, timeout=120)

    assert ended.state.is_crashed()
    assert ended.state.message.startswith(
        f"VM {ended.infrastructure_pid} stopped before the run ended; its console ended with:"
    )
    assert "(no boot output)" not in ended.state.message
    assert pool.wait_no_vms() == []


def test_the_worker_rides_out_an_api_outage_and_deletes_the_vm_after(
    prefect_server, client, vm_image, bundle_url, moto, tmp_path
):
    """Every read of the run fails for a while (the VM talks to the API directly): the
    worker neither deletes the VM nor crashes the run for it, and cleans up after."""
    with FaultProxy(prefect_server.url) as api:
        vm_env = {**moto.env(), "RUNNER_CLOUD": "none", "PREFECT_API_URL": prefect_server.api_url}
        pool = LocalPool(
            prefect_server, client, bundle_url, tmp_path,
            variables={"machine_image": vm_image, "env": vm_env},
            # Prefect's client would retry each read itself for a minute: off, so that the
            # worker's own patience is what is tested.
            worker_env={"PREFECT_API_URL": f"{api.url}/api", "PREFECT_CLIENT_MAX_RETRIES": "0"},
        )  # fmt: skip
        try:
            pool.start_worker()
            run = pool.run("numbered_logs", count=8, pause=1.0)
            pool.wait_state(run.id, "RUNNING")
            api.answer(
                lambda r: r.method == "GET" and r.path.endswith(f"/flow_runs/{run.id}"),
                503, b'{"detail": "unavailable"}', content_type="application/json", times=8,
            )  # fmt: skip
            ended = pool.wait_final(run.id)
            pool.wait_for_log(f"VM {ended.infrastructure_pid} deleted")
            log = pool.worker_log()
        finally:
            pool.close()

    assert ended.state.is_completed(), ended.state
    assert "could not read the flow run (will again)" in log
    assert pool.vms() == []
