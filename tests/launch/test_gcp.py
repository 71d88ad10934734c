"""The `vm` worker on the gcp provider, against a loopback Compute Engine stand-in
(devtools/gce_api.py; the real google-cloud-compute, a real worker process). The stand-in
starts no machines: a simulator plays them, reading each new instance's
``prefect-vm-runner-env`` metadata back, running the runner with it as the image's unit
would, and powering the instance off (TERMINATED, its disk kept) when the runner tears down."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from google.oauth2.credentials import Credentials

from devtools.gce_api import IMAGES, PROJECT, TOKEN, ZONE, GceApi
from runner.errors import ConfigError
from runner.launch.providers.base import TAG_FLOW_RUN, TAG_POOL, CapacityError, VmRequest
from runner.launch.providers.gcp import (
    USER_DATA_KEY,
    GcpProvider,
    api_endpoint,
    from_config,
    gce_labels,
    label_value,
)
from tests.helpers import run_cli
from tests.launch.conftest import Pool, vm_env
from tests.launch.simulator import VmSimulator

TYPES = ["n2-standard-2", "n2-standard-4"]
IMAGE = f"projects/{PROJECT}/global/images/family/{next(iter(IMAGES.values()))[0]}"


class SimulatedVms(VmSimulator):
    """The stand-in's instances of the pool: the user-data is their metadata attribute,
    and a poweroff leaves the instance TERMINATED with its boot disk, as on GCE.
    ``booted[name]`` is the instance as GCE had it at boot."""

    def __init__(self, gce: GceApi, moto, pool: str, workdir: Path) -> None:
        super().__init__(moto, workdir)
        self.gce, self.label = gce, label_value(pool)
        self.booted: dict[str, dict] = {}

    def running(self) -> list[str]:
        instances = self.gce.instances({TAG_POOL: self.label})
        for instance in instances:
            self.booted.setdefault(instance["name"], instance)
        return [i["name"] for i in instances if i["status"] == "RUNNING"]

    def read_user_data(self, vm_id: str) -> tuple[str, str]:
        text = self.gce.metadata(vm_id)[USER_DATA_KEY]
        return text, text

    def power_off(self, vm_id: str) -> None:
        self.gce.power_off(vm_id)


class GcpPool(Pool):
    def __init__(self, *args, gce: GceApi, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gce = gce

    def instances(self) -> list[dict]:
        return self.gce.instances({TAG_POOL: label_value(self.name)})

    def vms(self) -> list[str]:
        """Instances in any state: a stopped one still bills for its disk."""
        return [instance["name"] for instance in self.instances()]


@pytest.fixture
def gce() -> Iterator[GceApi]:
    with GceApi() as api:
        yield api


def _pool(prefect_server, client, bundle_url, tmp_path, moto, gce, **variables) -> GcpPool:
    env = vm_env(moto)
    return GcpPool(
        prefect_server, client, bundle_url, tmp_path, gce=gce, worker_env=gce.env(),
        variables={"provider": "gcp", "project": PROJECT, "zone": ZONE, "machine_image": IMAGE,
                   "vm_types": TYPES, "env": env, **variables},
    )  # fmt: skip


@pytest.fixture
def gcp_pool(prefect_server, client, bundle_url, tmp_path, moto, gce) -> Iterator[GcpPool]:
    pool = _pool(prefect_server, client, bundle_url, tmp_path, moto, gce)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def provider(gce) -> GcpProvider:
    """The provider in this process, on a static token the stand-in accepts."""
    return GcpProvider(
        project=PROJECT, zone=ZONE, credentials=Credentials(token=TOKEN), api_endpoint=gce.url
    )


def _request(**changes: object) -> VmRequest:
    fields: dict = {
        "name": "prefect-vm-0123456789ab-c0ffee",
        "vm_type": TYPES[0],
        "spot": False,
        "machine_image": IMAGE,
        "user_data": {"RUNNER_FLOW_RUN_ID": "x"},
        "tags": {TAG_POOL: "vms-test"},
    }
    return VmRequest(**{**fields, **changes})


def test_a_run_gets_an_instance_with_its_metadata_labels_and_spot_scheduling(
    gcp_pool, gce, moto, tmp_path
):
    with SimulatedVms(gce, moto, gcp_pool.name, tmp_path / "vms") as vms:
        gcp_pool.start_worker()
        run = gcp_pool.run(
            "hello", n=3,
            job_variables={"spot_policy": "spot", "disk_size": 20, "tags": {"Team": "Data Sci"},
                           "vm_types": None, "cpu": 4, "memory": 16},
        )  # fmt: skip
        ended = gcp_pool.wait_final(run.id)
        assert gcp_pool.wait_no_vms() == []  # powered off, then deleted by the worker

    assert ended.state.is_completed(), ended.state
    [(name, instance)] = vms.booted.items()
    assert name == ended.infrastructure_pid
    # the catalog's cheapest with 4 vCPUs and 16 GiB
    assert instance["machineType"].endswith(f"/zones/{ZONE}/machineTypes/e2-standard-4")
    assert instance["scheduling"]["provisioningModel"] == "SPOT"
    assert instance["scheduling"]["instanceTerminationAction"] == "DELETE"
    labels = instance["labels"]
    assert labels[TAG_POOL] == gcp_pool.name and labels[TAG_FLOW_RUN] == str(run.id)
    assert gce_labels({"Team": "Data Sci"}).items() <= labels.items()
    [disk] = instance["disks"]
    assert disk["boot"] and disk["autoDelete"] and disk["diskSizeGb"] == "20"
    env_file = (tmp_path / "vms" / f"{name}.env").read_text()
    assert f'RUNNER_FLOW_RUN_ID="{run.id}"' in env_file.splitlines()
    assert "RUNNER_HOURLY_COST" not in env_file  # a spot price is not known in advance
    # Gone, and its disk with it: nothing of the run's VM is left billing.
    assert gce.instance(name) is None and gce.disks() == []
    assert ("DELETE", f"/compute/v1/projects/{PROJECT}/zones/{ZONE}/instances/{name}") in (
        gce.requests
    )


def test_capacity_errors_fall_back_to_the_next_type_then_on_demand(
    prefect_server, client, bundle_url, tmp_path, moto, gce
):
    # No spot capacity (said in the operation, then as an HTTP error), and no
    # n2-standard-2 on demand: n2-standard-4 on demand is next.
    gce.exhaust(TYPES[0], "SPOT")
    gce.exhaust(TYPES[1], "SPOT", via="http")
    gce.exhaust(TYPES[0], "STANDARD")
    pool = _pool(
        prefect_server, client, bundle_url, tmp_path, moto, gce, spot_policy="spot_with_fallback"
    )
    try:
        with SimulatedVms(gce, moto, pool.name, tmp_path / "vms") as vms:
            pool.start_worker()
            run = pool.run("hello", n=2)
            ended = pool.wait_final(run.id)
            assert pool.wait_no_vms() == []
        logs = _logs(client, run.id)
    finally:
        pool.close()

    assert ended.state.is_completed(), ended.state
    [instance] = vms.booted.values()
    assert instance["machineType"].endswith(f"/machineTypes/{TYPES[1]}")
    assert instance["scheduling"]["provisioningModel"] == "STANDARD"
    tries = [line for line in logs if line.startswith("starting VM ")]
    assert [line.split("(")[1].split(")")[0] for line in tries] == [
        "n2-standard-2, spot", "n2-standard-4, spot",
        "n2-standard-2, on-demand", "n2-standard-4, on-demand",
    ]  # fmt: skip
    assert any("no capacity for n2-standard-4, spot: ZONE_RESOURCE_POOL_EXHAUSTED" in line
               for line in logs)  # fmt: skip
    assert any("no capacity for n2-standard-2, on-demand: ZONE_RESOURCE_POOL_EXHAUSTED" in line
               for line in logs)  # fmt: skip
    assert gce.instances() == [] and gce.disks() == []


def test_the_sweep_command_deletes_a_tagged_leftover(gcp_pool, gce, client, flow_run):
    from prefect.states import Completed

    done = flow_run("hello", n=1)
    client.set_flow_run_state(done.id, Completed(), force=True)
    pool_label = {TAG_POOL: label_value(gcp_pool.name)}
    gce.add_instance("leftover", labels={**pool_label, TAG_FLOW_RUN: str(done.id)})
    waiting = str(flow_run("hello", n=1).id)
    gce.add_instance("running", labels={**pool_label, TAG_FLOW_RUN: waiting})

    swept = run_cli(
        "launch", "sweep", "--pool", gcp_pool.name, "--grace", "0",
        env={**os.environ, **gcp_pool.server.env(), **gce.env()},
    )  # fmt: skip

    assert swept.returncode == 0, swept.stderr
    assert f"sweep: deleting VM leftover of pool {gcp_pool.name}" in swept.stdout
    assert gcp_pool.vms() == ["running"]  # its run is still to come: kept
    assert gce.disks() == ["running"]


def test_an_image_that_does_not_exist_crashes_the_run_and_creates_nothing(gcp_pool, gce):
    gcp_pool.start_worker()
    image = f"projects/{PROJECT}/global/images/prefect-vm-runner-19990101"
    run = gcp_pool.run("hello", job_variables={"machine_image": image})

    ended = gcp_pool.wait_final(run.id, timeout=60)

    assert ended.state.is_crashed()
    assert ended.state.message == (
        f"could not start a VM: reading the machine image: the machine image {image} does not exist"
    )
    assert gce.instances() == [] and not _inserts(gce)


def test_an_unknown_type_crashes_the_run_and_creates_nothing(gcp_pool, gce):
    gcp_pool.start_worker()
    run = gcp_pool.run("hello", job_variables={"vm_types": ["n9-huge-1"]})

    ended = gcp_pool.wait_final(run.id, timeout=60)

    assert ended.state.is_crashed()
    assert ended.state.message == (
        f"could not start a VM: checking machine type n9-huge-1: there is no machine type "
        f"n9-huge-1 in {ZONE}"
    )
    assert gce.instances() == [] and not _inserts(gce)


# The provider in this process, against the same stand-in.


def test_a_stopped_instance_keeps_its_disk_until_deleted(provider, gce):
    vm = provider.create(_request(user_data={"A": 'quoted "value" # and more'}))
    assert vm.state == "running" and vm.vm_type == TYPES[0] and not vm.spot
    assert gce.metadata(vm.id) == {USER_DATA_KEY: 'A="quoted \\"value\\" # and more"\n'}
    assert [v.id for v in provider.list("vms-test")] == [vm.id]

    gce.power_off(vm.id)
    assert provider.describe(vm.id).state == "stopped"
    assert gce.disks() == [vm.id]  # billed, while it stays

    provider.delete(vm.id)
    assert provider.describe(vm.id).state == "gone"
    assert gce.disks() == []
    provider.delete(vm.id)  # gone already: not an error


def test_a_disk_left_by_a_gone_instance_is_deleted(provider, gce):
    gce.add_disk("prefect-vm-left")

    provider.delete("prefect-vm-left")

    assert gce.disks() == []


@pytest.mark.parametrize(
    ("status", "state"),
    [("PROVISIONING", "starting"), ("STAGING", "starting"), ("RUNNING", "running"),
     ("STOPPING", "stopped"), ("TERMINATED", "stopped"), ("SUSPENDED", "stopped")],
)  # fmt: skip
def test_describe_maps_gce_states(provider, gce, status, state):
    gce.add_instance("vm-1", status=status, labels={TAG_FLOW_RUN: "abc"})

    vm = provider.describe("vm-1")

    assert (vm.state, vm.tags, vm.vm_type) == (state, {TAG_FLOW_RUN: "abc"}, "n2-standard-2")
    assert vm.created is not None and vm.created.tzinfo is not None


def test_pool_labels_are_sanitized_the_same_way_to_create_and_to_list(provider, gce):
    label = label_value("Prod Pool")
    assert label == label_value("Prod Pool") != label_value("prod-pool")
    assert label != label_value("Prod.Pool")  # cleaned alike, told apart by the digest
    long = label_value("x" * 100)
    assert len(long) == 63 and long.startswith("x" * 54)
    gce.add_instance("a", labels={TAG_POOL: label})
    gce.add_instance("b", labels={TAG_POOL: "prod-pool"})

    assert [vm.id for vm in provider.list("Prod Pool")] == ["a"]
    assert [vm.id for vm in provider.list("prod-pool")] == ["b"]
    labels = gce_labels({"Cost Centre": "R&D", "9lives": "ok", "fine": "as-is"})
    assert labels["fine"] == "as-is" and labels[next(k for k in labels if "cost" in k)] != "R&D"
    assert all(key[0].isalpha() for key in labels)


def test_capacity_from_an_operation_or_http_leaves_nothing(provider, gce):
    gce.exhaust(TYPES[0], "SPOT")
    gce.exhaust(TYPES[1], via="http")

    with pytest.raises(CapacityError, match="^ZONE_RESOURCE_POOL_EXHAUSTED: The zone"):
        provider.create(_request(spot=True))
    with pytest.raises(CapacityError, match="^ZONE_RESOURCE_POOL_EXHAUSTED: The zone"):
        provider.create(_request(vm_type=TYPES[1]))

    assert gce.instances() == [] and gce.disks() == []
    assert provider.create(_request()).state == "running"  # on demand there is room


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"vm_type": ""}, "the gcp provider needs a machine type (vm_types)"),
        ({"machine_image": ""}, "the gcp provider needs machine_image"),
        ({"machine_image": "projects/p/images/x"}, "is not a GCE image"),
        ({"disk_size_gb": 1}, "Requested disk size cannot be smaller than the image size"),
    ],
)
def test_bad_input_is_one_config_error(provider, gce, changes, says):
    with pytest.raises(ConfigError) as raised:
        provider.create(_request(**changes))

    assert says in str(raised.value) and "\n" not in str(raised.value)
    assert gce.instances() == []


def test_a_wrong_token_is_refused(gce):
    stranger = GcpProvider(
        project=PROJECT, zone=ZONE, credentials=Credentials(token="nope"), api_endpoint=gce.url
    )

    with pytest.raises(ConfigError, match="credentials"):
        stranger.list("vms-test")
    assert stranger.console("vm-1") == ""
    bare = httpx.get(f"{gce.url}/compute/v1/projects/{PROJECT}/zones/{ZONE}/instances")
    assert bare.status_code == 401 and bare.json()["error"]["code"] == 401


def test_the_stand_in_refuses_a_body_of_another_shape(gce):
    url = f"{gce.url}/compute/v1/projects/{PROJECT}/zones/{ZONE}/instances"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"name": "vm-1", "machineType": f"zones/{ZONE}/machineTypes/{TYPES[0]}",
            "disks": [], "networkInterfaces": [{"network": "global/networks/default"}],
            "tags": {"items": ["x"]}}  # fmt: skip

    answer = httpx.post(url, json=body, headers=headers)

    assert answer.status_code == 400
    assert answer.json()["error"]["errors"][0]["reason"] == "invalid"
    assert gce.instances() == []


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"zone": ZONE}, "the gcp provider needs project"),
        ({"project": PROJECT}, "the gcp provider needs zone"),
        ({"project": PROJECT, "zone": ZONE, "region": "europe-west1"}, "is not in the region"),
        ({"project": PROJECT, "zone": ZONE, "security_groups": ["sg-1"]}, "no security_groups"),
    ],
)
def test_provider_settings_are_checked_in_one_line(config, says):
    with pytest.raises(ConfigError, match=says):
        from_config(**config)


def test_the_endpoint_override_is_gclouds():
    assert api_endpoint("http://127.0.0.1:8080/compute/v1/") == "http://127.0.0.1:8080"
    assert api_endpoint("https://compute.example.p.googleapis.com/compute/beta") == (
        "https://compute.example.p.googleapis.com"
    )
    assert api_endpoint("https://compute.googleapis.com") == "https://compute.googleapis.com"


def _inserts(gce: GceApi) -> list[tuple[str, str]]:
    return [(method, path) for method, path in gce.requests if method == "POST"]


def _logs(client, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]
