"""The `vm` worker on the azure provider, against a loopback ARM stand-in (the real
azure-mgmt SDKs over TLS, DefaultAzureCredential through a managed-identity endpoint, a real
worker process). ARM starts no machines: a simulator plays them, reading each new VM's custom
data back from the stand-in, running the runner with it as the image's unit would, and
powering the VM off when the runner ends (Azure keeps it allocated: the worker deletes it)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.azure_api import AzureApi, StaticToken
from runner.errors import BootstrapError, ConfigError
from runner.launch.providers.azure import AzureProvider, from_config
from runner.launch.providers.base import TAG_FLOW_RUN, TAG_POOL, CapacityError, VmRequest
from tests.helpers import run_cli
from tests.launch.conftest import Pool, vm_env
from tests.launch.simulator import VmSimulator

TYPES = ["Standard_D2s_v5", "Standard_D4s_v5"]


@pytest.fixture
def api() -> Iterator[AzureApi]:
    with AzureApi() as api:
        yield api


class SimulatedVms(VmSimulator):
    """The stand-in's VMs of the pool: the user-data is the cloud-config of their custom
    data, and a poweroff leaves the VM stopped but allocated (billed), as on Azure."""

    def __init__(self, api: AzureApi, moto, pool: str, workdir: Path) -> None:
        super().__init__(moto, workdir)
        self.api, self.pool = api, pool
        self.custom_data = self.user_data  # VM name -> the cloud-config it was given

    def running(self) -> list[str]:
        names = []
        for name in self.api.vms(tag=(TAG_POOL, self.pool)):
            vm = self.api.vm(name)
            statuses = vm["properties"]["instanceView"]["statuses"] if vm else []
            if "PowerState/running" in [status["code"] for status in statuses]:
                names.append(name)
        return names

    def read_user_data(self, vm_id: str) -> tuple[str, str]:
        cloud_config = self.api.custom_data(vm_id)
        assert cloud_config.startswith("#cloud-config\n")
        [entry] = json.loads(cloud_config.split("\n", 1)[1])["write_files"]
        return cloud_config, entry["content"]

    def power_off(self, vm_id: str) -> None:
        self.api.power_off(vm_id)


class AzurePool(Pool):
    def __init__(self, *args, api: AzureApi, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.api = api

    def vms(self) -> list[str]:
        """The pool's VMs that exist, in any power state (stopped ones still bill)."""
        return self.api.vms(tag=(TAG_POOL, self.name))


def _pool(prefect_server, client, bundle_url, tmp_path, moto, api, **variables) -> AzurePool:
    env = vm_env(moto)
    return AzurePool(
        prefect_server, client, bundle_url, tmp_path, api=api, worker_env=api.env(),
        variables={"provider": "azure", "project": api.subscription,
                   "resource_group": api.resource_group, "region": api.location,
                   "subnet": api.subnet_id, "machine_image": api.image_id,
                   "vm_types": TYPES, "env": env, **variables},
    )  # fmt: skip


@pytest.fixture
def azure_pool(prefect_server, client, bundle_url, tmp_path, moto, api) -> Iterator[AzurePool]:
    pool = _pool(prefect_server, client, bundle_url, tmp_path, moto, api)
    try:
        yield pool
    finally:
        pool.close()


def _eventually(check, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not (ok := check()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return ok


def _nothing_left(api: AzureApi, timeout: float = 30) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout
    while (left := api.resources()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_a_run_gets_a_spot_vm_with_its_custom_data_and_tags_and_nothing_is_left(
    azure_pool, api, moto, tmp_path
):
    with SimulatedVms(api, moto, azure_pool.name, tmp_path / "vms") as vms:
        azure_pool.start_worker()
        run = azure_pool.run(
            "hello", n=3,
            job_variables={"spot_policy": "spot", "vm_types": None, "cpu": 4, "memory": 16},
        )  # fmt: skip
        ended = azure_pool.wait_final(run.id)
        assert azure_pool.wait_no_vms() == []  # stopped by its poweroff, deleted by the worker

    assert ended.state.is_completed(), ended.state
    name = ended.infrastructure_pid
    assert vms.teardowns(name) == ["0"]
    assert _nothing_left(api) == {}  # its NIC and OS disk went with it
    body = api.vm_requests[name.lower()]
    properties = body["properties"]
    cheapest = "Standard_D4as_v5"  # the catalog's cheapest with 4 vCPUs and 16 GiB
    assert properties["hardwareProfile"]["vmSize"] == cheapest
    assert properties["priority"] == "Spot" and properties["evictionPolicy"] == "Delete"
    assert properties["billingProfile"] == {"maxPrice": -1}
    assert properties["storageProfile"]["imageReference"] == {"id": api.image_id}
    assert properties["storageProfile"]["osDisk"]["deleteOption"] == "Delete"
    [nic] = properties["networkProfile"]["networkInterfaces"]
    assert nic["properties"]["deleteOption"] == "Delete"
    assert body["tags"][TAG_POOL] == azure_pool.name and body["tags"][TAG_FLOW_RUN] == str(run.id)
    assert f'RUNNER_FLOW_RUN_ID=\\"{run.id}\\"' in vms.custom_data[name]
    assert f"VM {name} started ({cheapest}, spot)" in azure_pool.worker_log()
    assert _eventually(lambda: f"VM {name} deleted" in azure_pool.worker_log())


def test_capacity_errors_fall_back_to_the_next_size_then_on_demand(
    prefect_server, client, bundle_url, tmp_path, moto, api
):
    # No spot capacity at all (refused at once), and no D2s on demand (the allocation fails
    # later, leaving a Failed VM with its disk): D4s on demand is next.
    api.no_capacity(priority="Spot", code="SkuNotAvailable")
    api.no_capacity(TYPES[0], "Regular", code="AllocationFailed")
    pool = _pool(
        prefect_server, client, bundle_url, tmp_path, moto, api, spot_policy="spot_with_fallback"
    )
    try:
        with SimulatedVms(api, moto, pool.name, tmp_path / "vms"):
            pool.start_worker()
            run = pool.run("hello", n=2)
            ended = pool.wait_final(run.id)
            assert pool.wait_no_vms() == []
        logs = _logs(client, run.id)
    finally:
        pool.close()

    assert ended.state.is_completed(), ended.state
    assert _nothing_left(api) == {}  # the failed VM, its disk and every NIC too
    properties = api.vm_requests[ended.infrastructure_pid.lower()]["properties"]
    assert properties["hardwareProfile"]["vmSize"] == TYPES[1] and "priority" not in properties
    tries = [line for line in logs if line.startswith("starting VM ")]
    assert [line.split("(")[1].split(")")[0] for line in tries] == [
        "Standard_D2s_v5, spot", "Standard_D4s_v5, spot",
        "Standard_D2s_v5, on-demand", "Standard_D4s_v5, on-demand",
    ]  # fmt: skip
    assert any("no capacity for Standard_D2s_v5, spot: SkuNotAvailable" in line for line in logs)
    assert any("no capacity for Standard_D2s_v5, on-demand: AllocationFailed" in line
               for line in logs)  # fmt: skip


def test_the_sweep_command_deletes_a_tagged_leftover_and_all_it_holds(
    azure_pool, api, client, flow_run, monkeypatch
):
    from prefect.states import Completed

    done = flow_run("hello", n=1)
    client.set_flow_run_state(done.id, Completed(), force=True)
    waiting = flow_run("hello", n=1)
    # Made by hand, as another tool would: its NIC has a public IP, and NIC and disk are
    # detached (not deleted) with the VM, so the sweep must delete each itself.
    leftover = _vm_by_hand(api, "leftover-1", {TAG_POOL: azure_pool.name,
                                               TAG_FLOW_RUN: str(done.id)})  # fmt: skip
    kept = _vm_by_hand(api, "kept-1", {TAG_POOL: azure_pool.name, TAG_FLOW_RUN: str(waiting.id)})

    swept = run_cli(
        "launch", "sweep", "--pool", azure_pool.name, "--grace", "0",
        env={**os.environ, **azure_pool.server.env(), **api.env()},
    )  # fmt: skip

    assert swept.returncode == 0, swept.stderr
    assert f"sweep: deleting VM {leftover} of pool {azure_pool.name}" in swept.stdout
    assert azure_pool.vms() == [kept]  # its run is still to come: kept
    assert api.resources() == {
        "virtualMachines": [kept],
        "networkInterfaces": [f"{kept}-nic"],
        "publicIPAddresses": [f"{kept}-ip"],
        "disks": [f"{kept}-disk"],
    }


def test_an_image_that_does_not_exist_crashes_the_run_and_leaves_nothing(azure_pool, api):
    azure_pool.start_worker()
    missing = api.image_id + "-missing"
    run = azure_pool.run("hello", job_variables={"machine_image": missing})

    ended = azure_pool.wait_final(run.id, timeout=60)

    assert ended.state.is_crashed()
    assert ended.state.message.startswith(
        f"could not start a VM: starting {TYPES[0]}: the machine image {missing} does not "
        f"exist in {api.location}"
    )
    assert "\n" not in ended.state.message
    assert _nothing_left(api) == {}  # the NIC made for it is gone too


def test_an_unknown_size_crashes_the_run_and_leaves_nothing(azure_pool, api):
    azure_pool.start_worker()
    run = azure_pool.run("hello", job_variables={"vm_types": ["Standard_Z99"]})

    ended = azure_pool.wait_final(run.id, timeout=60)

    assert ended.state.is_crashed()
    assert f"there is no VM size Standard_Z99 in {api.location}" in ended.state.message
    assert "\n" not in ended.state.message
    assert _nothing_left(api) == {}


# -- the provider alone, in this process --------------------------------------------------


@pytest.fixture
def provider(api, monkeypatch) -> AzureProvider:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", api.ca_file)
    return AzureProvider(
        project=api.subscription, resource_group=api.resource_group, region=api.location,
        subnet=api.subnet_id, identity=api.identity_id, arm_endpoint=api.url,
        credential=StaticToken(),
    )  # fmt: skip


def _request(api: AzureApi, name: str, **fields) -> VmRequest:
    values = dict(vm_type=TYPES[0], spot=False, machine_image=api.image_id,
                  user_data={"RUNNER_FLOW_RUN_ID": "x"}, tags={TAG_POOL: "p"})  # fmt: skip
    return VmRequest(name=name, **{**values, **fields})


def test_a_vm_goes_from_running_to_stopped_to_gone_and_takes_its_disk_and_nic(api, provider):
    vm = provider.create(_request(api, "vm-a", disk_size_gb=64))

    assert vm.state == "running" and vm.vm_type == TYPES[0] and not vm.spot
    assert vm.created is not None and vm.tags == {TAG_POOL: "p"}
    body = api.vm_requests["vm-a"]
    assert body["identity"] == {"type": "UserAssigned",
                                "userAssignedIdentities": {api.identity_id: {}}}  # fmt: skip
    assert body["properties"]["storageProfile"]["osDisk"]["diskSizeGB"] == 64
    assert [v.id for v in provider.list("p")] == ["vm-a"] and provider.list("other") == []
    assert "Linux version" in provider.console("vm-a")  # read without the ARM token
    api.power_off("vm-a")
    assert provider.describe("vm-a").state == "stopped"
    assert api.resources() == {  # powered off, it still holds (and bills) all of it
        "virtualMachines": ["vm-a"],
        "networkInterfaces": ["vm-a-nic"],
        "disks": ["vm-a-osdisk"],
    }
    provider.delete("vm-a")
    assert provider.describe("vm-a").state == "gone"
    assert api.resources() == {}
    provider.delete("vm-a")  # gone already: not an error
    assert provider.console("vm-a") == ""


def test_a_capacity_error_leaves_nothing_behind(api, provider):
    api.no_capacity(TYPES[0], code="ZonalAllocationFailed")

    with pytest.raises(CapacityError, match="^ZonalAllocationFailed: Allocation failed"):
        provider.create(_request(api, "vm-b"))

    assert api.resources() == {}


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"project": None}, "the azure provider needs project (the Azure subscription id)"),
        ({"region": ""}, "the azure provider needs region (the Azure location)"),
        ({"security_groups": ["a", "b"]}, "takes one network security group"),
    ],
)
def test_missing_or_bad_settings_are_one_line(api, config, says):
    base = {"project": api.subscription, "resource_group": api.resource_group,
            "region": api.location}  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(says)):
        from_config(**{**base, **config})


def test_no_credentials_and_refused_credentials_are_config_errors(api, monkeypatch):
    from azure.core.credentials import AccessToken
    from azure.identity import CredentialUnavailableError

    class Nothing:
        def get_token(self, *scopes, **kwargs):
            raise CredentialUnavailableError(message="no credential here")

    class Wrong:
        def get_token(self, *scopes, **kwargs):
            return AccessToken("not-the-token", int(time.time()) + 3600)

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", api.ca_file)
    settings = {
        "project": api.subscription,
        "resource_group": api.resource_group,
        "region": api.location,
        "subnet": api.subnet_id,
        "arm_endpoint": api.url,
    }
    with pytest.raises(ConfigError, match="no usable Azure credentials .* no credential here"):
        AzureProvider(credential=Nothing(), **settings).list("p")
    with pytest.raises(ConfigError, match="Azure refused the credentials .InvalidAuthentication"):
        AzureProvider(credential=Wrong(), **settings).create(_request(api, "vm-c"))
    assert api.resources() == {}


def test_an_unreachable_arm_is_a_bootstrap_error(api, monkeypatch):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)  # so the certificate is refused
    provider = AzureProvider(
        project=api.subscription, resource_group=api.resource_group, region=api.location,
        arm_endpoint=api.url, credential=StaticToken(),
    )  # fmt: skip
    with pytest.raises(BootstrapError, match="^describing VM x: "):
        provider.describe("x")


def test_the_stand_in_refuses_requests_without_a_token_or_an_api_version(api):
    import ssl

    import httpx

    path = (
        f"{api.url}/subscriptions/{api.subscription}/resourceGroups/{api.resource_group}"
        "/providers/Microsoft.Compute/virtualMachines"
    )
    with httpx.Client(verify=ssl.create_default_context(cafile=api.ca_file)) as http:
        no_token = http.get(path, params={"api-version": "2024-07-01"})
        no_version = http.get(path, headers={"Authorization": "Bearer test-token"})
        unknown = http.put(
            f"{path}/x", params={"api-version": "2024-07-01"}, json={"location": api.location,
            "properties": {}, "colour": "blue"}, headers={"Authorization": "Bearer test-token"},
        )  # fmt: skip

    assert no_token.status_code == 401
    assert no_token.json()["error"]["code"] == "AuthenticationFailed"
    assert no_version.status_code == 400
    assert no_version.json()["error"]["code"] == "MissingApiVersionParameter"
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "InvalidRequestContent"


# -- helpers ---------------------------------------------------------------------------------


def _vm_by_hand(api: AzureApi, name: str, tags: dict[str, str]) -> str:
    """A VM made with the SDKs directly (not by the provider): a public IP on its NIC, NIC
    and disk detached on delete, a password instead of a key."""
    from azure.mgmt.compute import ComputeManagementClient
    from azure.mgmt.network import NetworkManagementClient

    options = {"base_url": api.url, "credential_scopes": [api.scope], "polling_interval": 1,
               "connection_verify": api.ca_file}  # fmt: skip
    compute = ComputeManagementClient(StaticToken(), api.subscription, **options)
    network = NetworkManagementClient(StaticToken(), api.subscription, **options)
    group, location = api.resource_group, api.location
    ip = network.public_ip_addresses.begin_create_or_update(
        group, f"{name}-ip", {"location": location, "sku": {"name": "Standard"},
                              "properties": {"publicIPAllocationMethod": "Static"}},
    ).result()  # fmt: skip
    nic = network.network_interfaces.begin_create_or_update(
        group, f"{name}-nic", {"location": location, "properties": {"ipConfigurations": [
            {"name": "ipconfig1", "properties": {"subnet": {"id": api.subnet_id},
                                                 "publicIPAddress": {"id": ip.id}}}]}},
    ).result()  # fmt: skip
    compute.virtual_machines.begin_create_or_update(
        group, name, {
            "location": location, "tags": tags,
            "properties": {
                "hardwareProfile": {"vmSize": TYPES[0]},
                "storageProfile": {"imageReference": {"id": api.image_id},
                                   "osDisk": {"name": f"{name}-disk", "createOption": "FromImage"}},
                "osProfile": {"computerName": name, "adminUsername": "ops",
                              "adminPassword": "Correct-Horse-9"},
                "networkProfile": {"networkInterfaces": [{"id": nic.id}]},
            },
        },
    ).result()  # fmt: skip
    return name


def _logs(client, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]
