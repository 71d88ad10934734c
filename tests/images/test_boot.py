"""The VM image boots, runs one flow run and powers itself off (``make image-test``).

The image is images/provision/*.sh run into a Debian rootfs with systemd, as Packer runs
them (devtools.vm_image); podman boots it with /sbin/init on the host's network, its
user-data pointing at this session's Prefect server and S3 server (moto) on loopback.
The container ending by itself is the VM powering itself off.
"""

from __future__ import annotations

import json
import statistics
from datetime import datetime

import pytest

from devtools.vm_image import Boot, Vm
from tests.helpers import unused_api_url

STEP = "runner.steps.pull_bundle"
BOOTS = 3  # of the good case; the figures are their medians
# From container start to poweroff: a good boot takes ~5 s here, a bad one ~1 s after
# its deadline (the claim timeout, the API wait).
BOOT_TIMEOUT = 180
BAD_BOOT_BOUND = 60  # seconds from /sbin/init to poweroff with a 5 s claim timeout

# A cold build (mmdebstrap, provisioning from PyPI) runs in the first test's setup.
pytestmark = [pytest.mark.image, pytest.mark.timeout(1200)]


def _user_data(prefect_server, moto, flow_run_id: object, **more: str) -> dict[str, str]:
    """What a platform would put in the VM's user-data for this run."""
    return {
        "RUNNER_FLOW_RUN_ID": str(flow_run_id),
        "PREFECT_API_URL": prefect_server.api_url,
        **moto.env(),  # AWS_ENDPOINT_URL and test credentials: the bundle is on moto
        "RUNNER_CLOUD": "none",  # no metadata service to ask on loopback
        "RUNNER_HEARTBEAT_SECONDS": "2",
        **more,
    }


def _flow_logs(client, flow_run_id) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def _powered_off_once(boot: Boot, exit_code: int) -> None:
    """The runner's teardown ran once, systemd powered off once, the container ended."""
    lines = boot.unit_lines()
    teardowns = [line for line in lines if "teardown: on-exit=" in line]
    assert len(teardowns) == 1 and f"on-exit=poweroff (exit code {exit_code})" in teardowns[0], (
        lines
    )
    assert boot.messages().count("System is powering down.") == 1
    assert "Reached target poweroff.target - System Power Off." in boot.messages()
    assert boot.exit_code == 0, boot.console[-3000:]


def test_image_boots_runs_the_flow_run_and_powers_off(
    vm_image, prefect_server, moto, bundle_url, flow_run, client
):
    samples = []
    for i in range(BOOTS):
        n = 21 + i
        run = flow_run("hello", n=n, path=None, pull_steps=[{STEP: {"url": bundle_url}}])
        with Vm(vm_image, user_data=_user_data(prefect_server, moto, run.id)) as vm:
            boot = vm.boot(timeout=BOOT_TIMEOUT)
            state = client.read_flow_run(run.id).state
            assert state.is_completed(), (state, boot.unit_lines())
            result = _stored_result(vm, state)

        assert result == 2 * n
        lines = boot.unit_lines()
        assert any(f"claimed flow run {run.id}" in line for line in lines), lines
        assert any(f"hello from the worker, n={n}" in line for line in lines), lines
        assert any(f"flow run {run.id} finished: Completed" in line for line in lines), lines
        assert not [line for line in lines if " ERROR " in line], lines
        _powered_off_once(boot, exit_code=0)

        first_line = min(
            log.timestamp
            for log in _flow_logs(client, run.id)
            if log.message.startswith("hello from the worker")
        )
        samples.append(
            {
                "init_to_first_line_s": _seconds(boot.started_at, first_line),
                "flow_end_to_poweroff_s": _seconds(state.timestamp, boot.finished_at),
                "boot_to_poweroff_s": _seconds(boot.started_at, boot.finished_at),
            }
        )
    _report(samples)


def _stored_result(vm: Vm, state) -> object:
    """The flow's result as it wrote it to its local result storage on the VM's disk."""
    metadata = state.data  # ResultRecordMetadata: where the result is, how to read it
    return metadata.serializer.loads(vm.read_file(metadata.storage_key))


def _seconds(start: datetime, end: datetime) -> float:
    return round((end - start).total_seconds(), 3)


def _report(samples: list[dict[str, float]]) -> None:
    medians = {
        measure: round(statistics.median(s[measure] for s in samples), 3) for measure in samples[0]
    }
    print()
    print(
        json.dumps(
            {"bench": "image-boot", "boots": len(samples), "median_s": medians, "samples": samples}
        )
    )
    print(
        f"image boot, median of {len(samples)}: /sbin/init -> flow's first line "
        f"{medians['init_to_first_line_s']:.2f}s, flow end -> poweroff "
        f"{medians['flow_end_to_poweroff_s']:.2f}s (boot to poweroff "
        f"{medians['boot_to_poweroff_s']:.2f}s)"
    )


@pytest.mark.parametrize(
    ("case", "why", "exit_code"),
    [
        ("missing", "no flow run id arrived in /etc/prefect-vm-runner/user-data.env within 5s", 2),
        ("malformed", "flow run id 'not-a-flow-run-id' is not a UUID", 2),
        ("unreachable", "unreachable for 3s", 3),
    ],
)
def test_bad_user_data_or_no_prefect_still_powers_off_with_one_line(
    vm_image, prefect_server, moto, flow_run, case, why, exit_code
):
    # The claim timeout is read before the user-data (which may never come): an image
    # sets it in the unit, as this drop-in does (README: "VM images").
    unit_environment = {"RUNNER_CLAIM_TIMEOUT": "5"}
    user_data: dict[str, str] | None
    if case == "missing":
        user_data = None
    elif case == "malformed":
        user_data = _user_data(prefect_server, moto, "not-a-flow-run-id")
    else:
        run = flow_run("hello")
        user_data = _user_data(
            prefect_server, moto, run.id, PREFECT_API_URL=unused_api_url(), RUNNER_API_WAIT="3"
        )

    with Vm(vm_image, user_data=user_data, unit_environment=unit_environment) as vm:
        boot = vm.boot(timeout=BOOT_TIMEOUT)

    errors = [line for line in boot.unit_lines() if " ERROR " in line]
    assert len(errors) == 1 and why in errors[0], boot.unit_lines()
    _powered_off_once(boot, exit_code=exit_code)
    assert (boot.finished_at - boot.started_at).total_seconds() < BAD_BOOT_BOUND
