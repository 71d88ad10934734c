"""The `vm` worker at fleet size on the aws provider: 100 runs at once for one worker, in a
pool whose concurrency limit is 25, while EC2 throttles a share of the worker's calls
(RequestLimitExceeded, injected at the HTTP level in front of moto).

moto starts no machines, and the runs need not run a flow: each instance plays its part as
soon as it exists. Its runner claims the run (Running) and ends it (Completed), then the VM
powers off, leaving the instance stopped, so that only the worker's delete (once it sees
the VM end) terminates it: every VM gone at the end is the worker's doing.

The Prefect server is on PostgreSQL, as a fleet's must be: on SQLite, 100 runs at once get
503s ("database is locked") that Prefect's own worker code crashes runs for (1 to 3 of 100
in each of four tries here), and take twice as long to launch."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from urllib.parse import parse_qs

import boto3
import pytest

from bench.launch_aws import most_at_once
from devtools.fault_proxy import FaultProxy, ec2_action, ec2_error
from runner.errors import BootstrapError
from runner.launch.providers.aws import RETRIES, AwsProvider, patient_with_throttling
from runner.launch.providers.base import TAG_FLOW_RUN, TAG_POOL, CapacityError, VmRequest
from tests.conftest import REPO
from tests.helpers import IN_CI
from tests.launch.conftest import vm_env
from tests.launch.test_aws import TYPES, AwsPool, _ec2, ami  # noqa: F401 (ami: a fixture)

RUNS = 100
LIMIT = 25  # the pool's concurrency limit
# The first RunInstances are throttled in a burst longer than botocore's few retries (what
# an account's empty request bucket does), then every few of each call the worker makes.
BURST = 50
EVERY = {"RunInstances": 4, "DescribeInstances": 3, "TerminateInstances": 3}
THROTTLED = ec2_error("RequestLimitExceeded", "Request limit exceeded.")
DEADLINE = 240.0  # seconds for all 100 to be launched and played (30 to 60 s here)


@pytest.fixture(scope="module")
def fleet_server(tmp_path_factory) -> Iterator:
    """A Prefect server on PostgreSQL, for this module only."""
    from devtools.prefect_server import PrefectServer

    try:
        from devtools.postgres_server import PostgresServer, postgres_bin

        postgres_bin()
    except RuntimeError as exc:  # not installed
        if IN_CI:
            pytest.fail(f"{exc}; CI must run the fleet test")
        pytest.skip(str(exc))
    home = tmp_path_factory.mktemp("fleet-prefect")
    with PostgresServer() as db, PrefectServer(home, database_url=db.database_url) as server:
        yield server


@pytest.fixture
def fleet_client(fleet_server):
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(fleet_server.api_url) as client:
        yield client


class FleetPool(AwsPool):
    """The pool, its worker started without ``--limit``: the pool's limit alone is not a
    hard one on PostgreSQL (Prefect's query for a pool's next runs skips those whose row
    is locked by a state change, and gives their slots to later runs: 26 to 28 of 25 were
    Pending or Running at once here), so the worker holds to it as its own limit, until
    it has deleted a run's VM."""

    def start_worker(self) -> None:
        self._worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", self.name,
             "--type", "vm", "--name", f"{self.name}-worker"],
            env={**os.environ, **self.server.env(), "PREFECT_WORKER_QUERY_SECONDS": "1",
                 "PREFECT_WORKER_HEARTBEAT_SECONDS": "5", **self.worker_env},
            cwd=REPO, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


@pytest.fixture
def fleet(fleet_server, fleet_client, tmp_path, moto, ami):  # noqa: F811
    """The pool (concurrency limit, paused), its worker polling, EC2 behind a proxy that
    throttles; a deployment in the pool."""
    from prefect.client.schemas.actions import WorkPoolUpdate

    with FaultProxy(moto.url) as proxy:
        rules = {"burst": proxy.answer(ec2_action("RunInstances"), 503, THROTTLED, times=BURST)}
        for action, every in EVERY.items():
            rules[action] = proxy.answer(ec2_action(action), 503, THROTTLED, every=every)
        pool = FleetPool(
            fleet_server, fleet_client, "", tmp_path, moto=moto,
            worker_env={**moto.env(), "AWS_ENDPOINT_URL_EC2": proxy.url},
            variables={"provider": "aws", "machine_image": ami, "region": "us-east-1",
                       "vm_types": TYPES, "env": vm_env(moto),
                       "api_key_in_ssm": True},  # one more thing per VM to delete
        )  # fmt: skip
        try:
            fleet_client.update_work_pool(
                pool.name, WorkPoolUpdate(concurrency_limit=LIMIT, is_paused=True)
            )
            deployment_id = fleet_client.create_deployment(
                flow_id=fleet_client.create_flow_from_name("hello"),
                name=f"fleet-{uuid.uuid4().hex[:8]}", entrypoint="flows.py:hello",
                work_pool_name=pool.name,
            )  # fmt: skip
            yield pool, proxy, rules, deployment_id
        finally:
            pool.close()


def test_100_runs_launch_within_the_pool_limit_through_throttling_and_leave_nothing(
    fleet, fleet_client, moto
):
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.states import Completed, Running

    client = fleet_client
    pool, proxy, rules, deployment_id = fleet
    runs = [client.create_flow_run_from_deployment(deployment_id) for _ in range(RUNS)]
    pool.start_worker()
    _wait_for_the_worker(client, pool)
    proxy.requests.clear()

    started = time.monotonic()
    client.update_work_pool(pool.name, WorkPoolUpdate(is_paused=False))  # all 100 due now
    played: dict[str, str] = {}  # instance id -> its run's id
    last_seen = next_check = 0.0
    while len(played) < RUNS:
        if time.monotonic() > next_check:
            _check_going(client, pool, deployment_id, started)
            next_check = time.monotonic() + 5
        listed = time.monotonic()
        for instance in pool.instances("pending", "running"):
            vm_id = instance["InstanceId"]
            if vm_id in played:
                continue
            last_seen = listed
            run_id = {t["Key"]: t["Value"] for t in instance["Tags"]}[TAG_FLOW_RUN]
            client.set_flow_run_state(run_id, Running())  # its runner claims the run
            client.set_flow_run_state(run_id, Completed(), force=True)  # and ends it
            pool.ec2.stop_instances(InstanceIds=[vm_id])  # the VM powers off
            played[vm_id] = run_id
        time.sleep(0.2)
    launched_all = last_seen - started

    assert pool.wait_no_vms(timeout=60) == [], "VMs the worker did not delete"
    deleted = _wait_for_deleted(pool, set(played))
    print(
        f"\n{RUNS} runs, pool limit {LIMIT}: all launched {launched_all:.1f}s, all deleted "
        f"{time.monotonic() - started:.1f}s after they were due; throttled: "
        + ", ".join(f"{name} {rule.hits}" for name, rule in rules.items())
    )

    # Every run went to its one VM and ended as its runner said: none was failed by the
    # throttling, nor moved to another type.
    ended = _runs_of(client, deployment_id)
    assert sorted(str(r.id) for r in ended) == sorted(str(r.id) for r in runs)
    assert [r.state.type.value for r in ended] == ["COMPLETED"] * RUNS
    assert {r.infrastructure_pid for r in ended} == set(played)
    instances = pool.instances()
    assert len(instances) == RUNS
    assert {i["InstanceType"] for i in instances} == {TYPES[0]}
    assert not any("InstanceLifecycle" in i for i in instances)  # on demand, as asked
    log = pool.worker_log()
    assert "try 2 of" not in log and "no capacity" not in log
    assert "Failed to submit flow run" not in log

    # The limit held: at no time were more than LIMIT of the pool's runs Pending or Running
    # (each run's state history, from its first Pending to its end), and it was reached.
    assert most_at_once([client.read_flow_run_states(run.id) for run in runs]) == LIMIT

    # EC2 throttled, and every throttled RunInstances was asked again, once each: one
    # instance per run, no more.
    assert rules["burst"].hits == BURST and all(rule.hits > 0 for rule in rules.values())
    launches = _actions(proxy)["RunInstances"]
    assert launches == RUNS + rules["burst"].hits + rules["RunInstances"].hits

    # Nothing left: every instance terminated (they were stopped: the worker did it), its
    # disk with it, and the SSM parameter holding each VM's API key deleted.
    assert deleted == set(played)
    assert {i["State"]["Name"] for i in instances} == {"terminated"}
    tagged = [{"Name": f"tag:{TAG_POOL}", "Values": [pool.name]}]
    assert pool.ec2.describe_volumes(Filters=tagged)["Volumes"] == []
    user_data = pool.ec2.describe_instance_attribute(
        InstanceId=next(iter(played)), Attribute="userData"
    )
    assert b"RUNNER_PREFECT_API_KEY_SSM" in base64.b64decode(user_data["UserData"]["Value"])
    assert _ssm_parameters_of(moto, runs) == []


def _wait_for_the_worker(client, pool: AwsPool, timeout: float = 60) -> None:
    """Until the worker polls: it registers (its first heartbeat) before its first poll."""
    deadline = time.monotonic() + timeout
    while not client.read_workers_for_work_pool(pool.name):
        assert time.monotonic() < deadline, f"no worker:\n{pool.worker_log()[-3000:]}"
        time.sleep(0.25)


def _check_going(client, pool: AwsPool, deployment_id, started: float) -> None:
    """Fail now, saying why, when a run crashed or the fleet takes too long."""
    bad = [
        r for r in _runs_of(client, deployment_id) if r.state.is_crashed() or r.state.is_failed()
    ]
    assert not bad, f"{bad[0].state.message}\n{pool.worker_log()[-3000:]}"
    assert time.monotonic() - started < DEADLINE, (
        f"not all launched in {DEADLINE}s:\n{pool.worker_log()[-3000:]}"
    )


def _runs_of(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        limit=RUNS + 1,
    )


def _wait_for_deleted(pool: AwsPool, vm_ids: set[str], timeout: float = 30) -> set[str]:
    """The VMs the worker says it deleted after their run, once it said so for all."""
    deadline = time.monotonic() + timeout
    while True:
        said = set(re.findall(r"VM (i-[0-9a-f]+) deleted", pool.worker_log()))
        if said >= vm_ids or time.monotonic() > deadline:
            return said
        time.sleep(0.5)


def _actions(proxy: FaultProxy) -> Counter[str]:
    return Counter(
        parse_qs(r.body.decode(errors="replace")).get("Action", ["?"])[0]
        for r in list(proxy.requests)
    )


def _ssm_parameters_of(moto, runs) -> list[str]:
    """The SSM parameters left that were made for one of these runs' VMs."""
    env = moto.env()
    ssm = boto3.client(
        "ssm", region_name=env["AWS_DEFAULT_REGION"], endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip
    prefixes = tuple(f"/prefect-vm-runner/prefect-vm-{run.id.hex[:12]}-" for run in runs)
    names = [
        p["Name"]
        for page in ssm.get_paginator("describe_parameters").paginate()
        for p in page["Parameters"]
    ]
    return [name for name in names if name.startswith(prefixes)]


def test_throttling_is_asked_again_until_it_passes_and_a_capacity_error_is_not(moto, ami):  # noqa: F811
    """The provider's client on its own: RequestLimitExceeded more times than botocore's
    standard mode tries is waited out; InsufficientInstanceCapacity is not (the worker
    tries the next type at once); throttling past the patience is AWS failing, not capacity."""
    pool = f"throttled-{uuid.uuid4().hex[:8]}"
    request = VmRequest(
        name=f"{pool}-vm", vm_type="m6i.large", spot=False, machine_image=ami,
        user_data={}, tags={TAG_POOL: pool},
    )  # fmt: skip
    with FaultProxy(moto.url) as proxy:
        no_capacity = proxy.answer(
            lambda r: ec2_action("RunInstances")(r) and b"InstanceType=m6i.xlarge" in r.body,
            500, ec2_error("InsufficientInstanceCapacity", "We currently do not have capacity"),
        )  # fmt: skip
        throttled = proxy.answer(ec2_action("RunInstances"), 503, THROTTLED, times=8)
        provider = AwsProvider(ec2=_throttled_client(moto, proxy))

        begun = time.monotonic()
        with pytest.raises(CapacityError, match="InsufficientInstanceCapacity"):
            provider.create(replace(request, vm_type="m6i.xlarge"))
        assert no_capacity.hits == 4 and time.monotonic() - begun < 5  # 1 + 3 retries, no more

        vm = provider.create(request)  # after 8 RequestLimitExceeded: botocore alone tries 4
        assert throttled.hits == 8 and vm.state in ("starting", "running")
        # Every try of that one call carried the same idempotency token (a try EC2 had
        # carried out would give back its instance, not start another), unlike the xlarge.
        tokens = [
            parse_qs(r.body.decode())["ClientToken"][0]
            for r in proxy.requests
            if ec2_action("RunInstances")(r)
        ]
        assert len(tokens) == 4 + 9 and len(set(tokens[4:])) == 1 and tokens[4] != tokens[0]

        impatient = AwsProvider(ec2=_throttled_client(moto, proxy, seconds=1))
        proxy.answer(ec2_action("TerminateInstances"), 503, THROTTLED)  # from now on, always
        with pytest.raises(BootstrapError, match="RequestLimitExceeded") as raised:
            impatient.delete(vm.id)
        assert not isinstance(raised.value, CapacityError)
    _ec2(moto).terminate_instances(InstanceIds=[vm.id])


def _throttled_client(moto, proxy: FaultProxy, *, seconds: float = 60):
    """An EC2 client as the provider makes one, through the proxy, its waits cut to 10 ms."""
    from botocore.config import Config

    env = moto.env()
    ec2 = boto3.client(
        "ec2", region_name=env["AWS_DEFAULT_REGION"], endpoint_url=proxy.url,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries=dict(RETRIES)),
    )  # fmt: skip
    patient_with_throttling(ec2, seconds=seconds, jitter=lambda low, high: min(high, 0.01))
    return ec2
