"""The `vm` worker on the aws provider, against moto's EC2 (the real boto3, a real worker
process). EC2 starts no machines: a simulator plays them, reading each new instance's
user-data back from moto, running the runner with it as the image's unit would, and
terminating the instance when the runner tears down, as the VM's poweroff does."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from devtools.fault_proxy import FaultProxy, ec2_error
from runner.launch.providers.base import TAG_FLOW_RUN, TAG_POOL
from tests.helpers import run_cli
from tests.launch.conftest import Pool, vm_env
from tests.launch.simulator import VmSimulator

TYPES = ["m6i.large", "m6i.xlarge"]


def _ec2(moto, endpoint: str | None = None):
    env = moto.env()
    return boto3.client(
        "ec2",
        region_name=env["AWS_DEFAULT_REGION"],
        endpoint_url=endpoint or env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


class SimulatedVms(VmSimulator):
    """moto's instances of the pool: the user-data is the cloud-config EC2 kept, and a
    poweroff terminates the instance (InstanceInitiatedShutdownBehavior=terminate)."""

    def __init__(self, moto, pool: str, workdir: Path, **kwargs) -> None:
        super().__init__(moto, workdir, **kwargs)
        self.ec2, self.pool = _ec2(moto), pool

    def running(self) -> list[str]:
        filters = [
            {"Name": f"tag:{TAG_POOL}", "Values": [self.pool]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
        reservations = self.ec2.describe_instances(Filters=filters)["Reservations"]
        return [i["InstanceId"] for r in reservations for i in r["Instances"]]

    def read_user_data(self, vm_id: str) -> tuple[str, str]:
        raw = self.ec2.describe_instance_attribute(InstanceId=vm_id, Attribute="userData")
        cloud_config = base64.b64decode(raw["UserData"]["Value"]).decode()
        assert cloud_config.startswith("#cloud-config\n")
        [entry] = json.loads(cloud_config.split("\n", 1)[1])["write_files"]
        return cloud_config, entry["content"]

    def power_off(self, vm_id: str) -> None:
        self.ec2.terminate_instances(InstanceIds=[vm_id])


class AwsPool(Pool):
    def __init__(self, *args, moto, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ec2 = _ec2(moto)

    def instances(self, *states: str) -> list[dict]:
        filters = [{"Name": f"tag:{TAG_POOL}", "Values": [self.name]}]
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        reservations = self.ec2.describe_instances(Filters=filters)["Reservations"]
        return [i for r in reservations for i in r["Instances"]]

    def vms(self) -> list[str]:
        """Instances that still bill: anything not terminated."""
        live = ("pending", "running", "stopping", "stopped", "shutting-down")
        return sorted(i["InstanceId"] for i in self.instances(*live))


@pytest.fixture(scope="session")
def ami(moto) -> str:
    return _ec2(moto).describe_images(Owners=["amazon"])["Images"][0]["ImageId"]


def _pool(prefect_server, client, bundle_url, tmp_path, moto, ami, **variables) -> AwsPool:
    env = vm_env(moto)
    worker_env = variables.pop("worker_env", moto.env())
    return AwsPool(
        prefect_server, client, bundle_url, tmp_path, moto=moto, worker_env=worker_env,
        variables={"provider": "aws", "machine_image": ami, "region": "us-east-1",
                   "vm_types": TYPES, "env": env, **variables},
    )  # fmt: skip


@pytest.fixture
def aws_pool(prefect_server, client, bundle_url, tmp_path, moto, ami) -> Iterator[AwsPool]:
    pool = _pool(prefect_server, client, bundle_url, tmp_path, moto, ami)
    try:
        yield pool
    finally:
        pool.close()


def test_a_run_gets_an_instance_with_its_user_data_tags_and_shutdown_behaviour(
    aws_pool, moto, tmp_path
):
    with SimulatedVms(moto, aws_pool.name, tmp_path / "vms") as vms:
        aws_pool.start_worker()
        run = aws_pool.run("hello", n=3, job_variables={"spot_policy": "spot"})
        ended = aws_pool.wait_final(run.id)
        assert aws_pool.wait_no_vms() == []  # terminated: by its poweroff, then the worker

    assert ended.state.is_completed(), ended.state
    [instance] = aws_pool.instances()
    assert instance["InstanceId"] == ended.infrastructure_pid
    assert instance["InstanceType"] == TYPES[0]
    assert instance.get("InstanceLifecycle") == "spot"
    tags = {tag["Key"]: tag["Value"] for tag in instance["Tags"]}
    assert tags[TAG_POOL] == aws_pool.name and tags[TAG_FLOW_RUN] == str(run.id)
    shutdown = aws_pool.ec2.describe_instance_attribute(
        InstanceId=instance["InstanceId"], Attribute="instanceInitiatedShutdownBehavior"
    )
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    assert f'RUNNER_FLOW_RUN_ID=\\"{run.id}\\"' in vms.user_data[instance["InstanceId"]]


def test_without_vm_types_the_cheapest_type_that_fits_and_its_price(aws_pool, moto, tmp_path):
    with SimulatedVms(moto, aws_pool.name, tmp_path / "vms") as vms:
        aws_pool.start_worker()
        run = aws_pool.run("hello", n=1, job_variables={"vm_types": None, "cpu": 4, "memory": 16})
        ended = aws_pool.wait_final(run.id)
        assert aws_pool.wait_no_vms() == []

    assert ended.state.is_completed(), ended.state
    [instance] = aws_pool.instances()
    assert instance["InstanceType"] == "t3.xlarge"  # the catalog's cheapest with 4 vCPUs, 16 GiB
    assert 'RUNNER_HOURLY_COST=\\"0.1664\\"' in vms.user_data[instance["InstanceId"]]


def test_capacity_errors_fall_back_to_the_next_type_then_on_demand(
    prefect_server, client, bundle_url, tmp_path, moto, ami
):
    with FaultProxy(moto.url) as proxy:
        # No spot capacity at all, and no m6i.large on demand: m6i.xlarge on demand is next.
        proxy.answer(
            lambda r: b"Action=RunInstances" in r.body and b"MarketType=spot" in r.body,
            400, ec2_error("MaxSpotInstanceCountExceeded", "Max spot instance count exceeded"),
        )  # fmt: skip
        proxy.answer(
            lambda r: b"Action=RunInstances" in r.body and b"InstanceType=m6i.large" in r.body,
            500, ec2_error("InsufficientInstanceCapacity", "We currently do not have capacity"),
        )  # fmt: skip
        pool = _pool(
            prefect_server, client, bundle_url, tmp_path, moto, ami,
            spot_policy="spot_with_fallback",
            worker_env={**moto.env(), "AWS_ENDPOINT_URL_EC2": proxy.url},
        )  # fmt: skip
        try:
            with SimulatedVms(moto, pool.name, tmp_path / "vms"):
                pool.start_worker()
                run = pool.run("hello", n=2)
                ended = pool.wait_final(run.id)
                assert pool.wait_no_vms() == []
            [instance] = pool.instances()
            logs = _logs(client, run.id)
        finally:
            pool.close()

    assert ended.state.is_completed(), ended.state
    assert instance["InstanceType"] == "m6i.xlarge" and "InstanceLifecycle" not in instance
    tries = [line for line in logs if line.startswith("starting VM ")]
    assert [line.split("(")[1].split(")")[0] for line in tries] == [
        "m6i.large, spot", "m6i.xlarge, spot", "m6i.large, on-demand", "m6i.xlarge, on-demand",
    ]  # fmt: skip
    assert any("no capacity for m6i.large, on-demand: InsufficientInstanceCapacity" in line
               for line in logs)  # fmt: skip


def test_the_sweep_command_terminates_a_tagged_leftover(aws_pool, moto, ami, client, flow_run):
    done = flow_run("hello", n=1)
    from prefect.states import Completed

    client.set_flow_run_state(done.id, Completed(), force=True)
    tags = [{"Key": TAG_POOL, "Value": aws_pool.name}, {"Key": TAG_FLOW_RUN, "Value": str(done.id)}]
    leftover = aws_pool.ec2.run_instances(
        ImageId=ami, InstanceType="m6i.large", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )["Instances"][0]["InstanceId"]  # fmt: skip
    running = aws_pool.ec2.run_instances(
        ImageId=ami, InstanceType="m6i.large", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags[:1] + [
            {"Key": TAG_FLOW_RUN, "Value": str(flow_run("hello", n=1).id)}]}],
    )["Instances"][0]["InstanceId"]  # fmt: skip

    swept = run_cli(
        "launch", "sweep", "--pool", aws_pool.name, "--grace", "0",
        env={**os.environ, **aws_pool.server.env(), **moto.env()},
    )  # fmt: skip

    assert swept.returncode == 0, swept.stderr
    assert f"sweep: deleting VM {leftover} of pool {aws_pool.name}" in swept.stdout
    assert aws_pool.vms() == [running]  # its run is still to come: kept


def test_an_image_that_does_not_exist_crashes_the_run_and_creates_nothing(aws_pool):
    aws_pool.start_worker()
    run = aws_pool.run("hello", job_variables={"machine_image": "ami-0123456789abcdef0"})

    ended = aws_pool.wait_final(run.id, timeout=60)

    assert ended.state.is_crashed()
    assert ended.state.message.startswith(
        "could not start a VM: reading the machine image: the machine image "
        "ami-0123456789abcdef0 does not exist in us-east-1"
    )
    assert aws_pool.instances() == []


def test_an_unknown_type_crashes_the_run_and_creates_nothing(aws_pool):
    aws_pool.start_worker()
    run = aws_pool.run("hello", job_variables={"vm_types": ["m99.huge"]})

    ended = aws_pool.wait_final(run.id, timeout=60)

    assert ended.state.is_crashed()
    assert "there is no instance type m99.huge in us-east-1" in ended.state.message
    assert aws_pool.instances() == []


def test_api_key_in_ssm_keeps_it_out_of_the_user_data(
    prefect_server, client, bundle_url, tmp_path, moto, ami
):
    key = os.environ["PREFECT_API_KEY"]  # the worker's own (a planted secret)
    with FaultProxy(prefect_server.url) as api:  # the API, wanting that key from everyone
        api.answer(
            lambda r: r.headers.get("authorization") != f"Bearer {key}",
            401, b'{"detail": "no or wrong API key"}', content_type="application/json",
        )  # fmt: skip
        pool = _pool(
            prefect_server, client, bundle_url, tmp_path, moto, ami, api_key_in_ssm=True,
            worker_env={**moto.env(), "PREFECT_API_URL": f"{api.url}/api"},
        )  # fmt: skip
        try:
            vms = SimulatedVms(moto, pool.name, tmp_path / "vms", unset=("PREFECT_API_KEY",))
            with vms:
                pool.start_worker()
                run = pool.run("hello", n=2)
                ended = pool.wait_final(run.id)
                pool.wait_for_log(f"VM {ended.infrastructure_pid} deleted")
        finally:
            pool.close()

    assert ended.state.is_completed(), ended.state  # the runner found the key in SSM
    [user_data] = vms.user_data.values()
    assert key not in user_data
    name = f"/prefect-vm-runner/prefect-vm-{run.id.hex[:12]}-"
    assert f'RUNNER_PREFECT_API_KEY_SSM=\\"{name}' in user_data
    ssm = boto3.client("ssm", **{k.lower(): v for k, v in _boto_args(moto).items()})
    assert ssm.describe_parameters()["Parameters"] == []  # deleted with the VM


def _boto_args(moto) -> dict[str, str]:
    env = moto.env()
    return {
        "region_name": env["AWS_DEFAULT_REGION"],
        "endpoint_url": env["AWS_ENDPOINT_URL"],
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
    }


def _logs(client, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_no_credentials_crashes_the_run_with_one_line(
    prefect_server, client, bundle_url, tmp_path, moto, ami
):
    no_credentials = {
        "AWS_ENDPOINT_URL": moto.url, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance role to look for on loopback
    }  # fmt: skip
    pool = _pool(prefect_server, client, bundle_url, tmp_path, moto, ami, worker_env=no_credentials)
    try:
        pool.start_worker()
        run = pool.run("hello")
        ended = pool.wait_final(run.id, timeout=60)
    finally:
        pool.close()

    assert ended.state.is_crashed()
    assert ended.state.message == (
        "could not start a VM: reading the machine image: no AWS credentials (an instance "
        "role, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile)"
    )
    assert pool.instances() == []
