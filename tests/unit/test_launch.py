"""The vm worker's pure parts: the order of what it tries, what the sweep deletes, and the
user-data it writes read back as the runner reads it."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from runner.errors import ConfigError
from runner.launch import catalog
from runner.launch.providers.base import TAG_CLAIM_TIMEOUT, TAG_FLOW_RUN, TAG_MAX_RUNTIME, Vm
from runner.launch.sweep import why_due
from runner.launch.user_data import as_env_file, render
from runner.launch.worker import VmJobConfiguration, _candidates
from runner.vm.user_data import read


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("on-demand", [("a", False), ("b", False)]),
        ("spot", [("a", True), ("b", True)]),
        # Every type on spot first, then every type on demand.
        ("spot_with_fallback", [("a", True), ("b", True), ("a", False), ("b", False)]),
    ],
)
def test_candidates_follow_the_types_then_the_spot_policy(policy, expected):
    configuration = VmJobConfiguration(vm_types=["a", "b"], spot_policy=policy)
    assert [(t, spot) for t, spot, _ in _candidates(configuration)] == expected


@pytest.mark.parametrize(
    ("needs", "expected"),
    [
        ({}, ["t3.medium", "t3.large", "c6i.large"]),
        ({"cpu": 4, "memory": 16}, ["t3.xlarge", "m6i.xlarge", "r6i.xlarge"]),
        ({"cpu": 4, "arm": True}, ["c7g.xlarge", "m7g.xlarge", "r7g.xlarge"]),
        ({"gpu": True}, ["g4dn.xlarge", "g4dn.2xlarge", "g5.xlarge"]),
        ({"memory": 100}, ["r6i.4xlarge", "m6i.8xlarge"]),
    ],
)
def test_without_vm_types_the_cheapest_catalog_types_that_fit(needs, expected):
    configuration = VmJobConfiguration(provider="aws", spot_policy="on-demand", **needs)
    candidates = _candidates(configuration)
    assert [t for t, _, _ in candidates] == expected
    assert all(price and price > 0 for _, _, price in candidates)  # the cost estimate


@pytest.mark.parametrize(
    ("cloud", "needs", "expected"),
    [
        ("gcp", {"cpu": 4, "memory": 16}, ["e2-standard-4", "e2-highmem-4", "n2-standard-4"]),
        ("gcp", {"cpu": 4, "arm": True}, ["t2a-standard-4", "t2a-standard-8"]),
        ("gcp", {"gpu": True}, ["g2-standard-4", "g2-standard-8", "a2-highgpu-1g"]),
        ("azure", {"cpu": 4, "memory": 16}, ["Standard_D4as_v5", "Standard_D4s_v5",
                                             "Standard_E4s_v5"]),
        ("azure", {"cpu": 2, "arm": True}, ["Standard_D2ps_v5", "Standard_D4ps_v5",
                                            "Standard_D8ps_v5"]),
        ("azure", {"gpu": True, "memory": 50}, ["Standard_NC8as_T4_v3",
                                                "Standard_NC24ads_A100_v4"]),
    ],
)  # fmt: skip
def test_gcp_and_azure_have_catalogs_too(cloud, needs, expected):
    configuration = VmJobConfiguration(provider=cloud, spot_policy="on-demand", **needs)
    assert [t for t, _, _ in _candidates(configuration)] == expected


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_each_packaged_catalog_is_as_the_refresh_writes_it(cloud):
    """So that a refresh's diff shows only what changed, and a hand edit keeps the shape."""
    text = catalog.packaged(cloud).read_text()
    types = catalog.load(cloud)
    assert catalog.dump(types, about=json.loads(text)["about"]) == text
    assert all(t.vcpus > 0 and t.memory_gib > 0 and t.on_demand > 0 for t in types.values())


def test_no_catalog_type_fits_is_one_line():
    configuration = VmJobConfiguration(provider="aws", cpu=4096)
    with pytest.raises(ConfigError, match="no type in the catalog meets 4096 vCPUs"):
        _candidates(configuration)


def test_a_spot_try_carries_no_price_and_local_has_no_types():
    spot = VmJobConfiguration(provider="aws", spot_policy="spot")
    assert {price for _, _, price in _candidates(spot)} == {None}
    assert _candidates(VmJobConfiguration(provider="local")) == [("", False, None)]


NOW = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
RUN = str(uuid.uuid4())


def _vm(state="running", age=3600.0, **tags: str) -> Vm:
    return Vm("vm-1", state, tags={TAG_FLOW_RUN: RUN, **tags}, created=NOW - timedelta(seconds=age))


def _run(state: str, ended_ago: float = 3600.0):
    return (state, NOW - timedelta(seconds=ended_ago))


@pytest.mark.parametrize(
    ("vm", "run", "due"),
    [
        (_vm(), _run("RUNNING"), None),
        (_vm(), _run("COMPLETED"), "is completed since 3600s"),
        (_vm(), _run("COMPLETED", ended_ago=60), None),  # its worker is still on it
        (_vm(), None, "no longer exists"),
        (_vm(age=60), _run("COMPLETED"), None),  # young: left to its worker
        (_vm(state="stopped", age=10), _run("COMPLETED", ended_ago=5), "powered off and"),
        (_vm(state="stopped", age=10), _run("RUNNING"), None),  # its worker reads its console
        (_vm(state="stopped"), _run("RUNNING"), "powered off while"),
        (_vm(**{TAG_MAX_RUNTIME: "600"}, age=1300), _run("RUNNING"), "outlived its max runtime"),
        (_vm(**{TAG_MAX_RUNTIME: "600"}, age=1100), _run("RUNNING"), None),
        (_vm(**{TAG_CLAIM_TIMEOUT: "600"}, age=1300), _run("PENDING"), "never claimed"),
        (_vm(**{TAG_CLAIM_TIMEOUT: "600"}, age=1100), _run("PENDING"), None),
        (Vm("other", "running", tags={}, created=NOW - timedelta(days=1)), _run("FAILED"), None),
    ],
)
def test_what_the_sweep_deletes(vm, run, due):
    asked = []

    def state_of(run_id):
        asked.append(run_id)
        return run

    reason = why_due(vm, state_of, grace=300, now=NOW)
    assert (reason is None) if due is None else (due in reason), reason
    if vm.state == "running" and (NOW - vm.created).total_seconds() <= 300:
        assert asked == []  # a young running VM costs no API call


def test_the_user_data_reads_back_as_the_runner_reads_it(tmp_path):
    run_id = uuid.uuid4()
    data = render(
        flow_run_id=run_id,
        api_url="http://127.0.0.1:4200/api",
        api_key="pnu_secret",
        env={"QUOTED": 'a "b" #c \\d', "NONE": None, "RUNNER_HEARTBEAT_SECONDS": "5"},
        software="s3://b/senv/x.json",
        max_runtime=3600,
    )
    path = tmp_path / "user-data.env"
    path.write_text(as_env_file(data))

    read_back = read(path)

    assert read_back.problem is None
    assert read_back.values == {
        "RUNNER_FLOW_RUN_ID": str(run_id),
        "PREFECT_API_URL": "http://127.0.0.1:4200/api",
        "PREFECT_API_KEY": "pnu_secret",
        "RUNNER_SENV_URL": "s3://b/senv/x.json",
        "RUNNER_MAX_RUNTIME": "3600",
        "QUOTED": 'a "b" #c \\d',
        "RUNNER_HEARTBEAT_SECONDS": "5",
    }
