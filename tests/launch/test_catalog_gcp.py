"""``python -m runner launch catalog gcp`` as users run it, against the loopback Compute
Engine and Cloud Billing stand-in (devtools/gce_api.py; the real google-cloud-compute and
google-auth): sizes from the machine types, prices from Compute Engine's SKUs, among which
the stand-in keeps decoys (spot, commitments, custom, sole-tenant, other regions) that must
never be taken for a list price."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.gce_api import BILLING_SERVICE, PROJECT, GceApi
from runner.launch.catalog import VmType, dump
from tests.helpers import assert_one_error_line, run_cli, unused_api_url
from tests.planted import planted

REGION = "us-central1"
TOKEN = planted("gce-token")  # the secrets check fails the session if it is ever printed
SKUS = f"/v1/services/{BILLING_SERVICE}/skus"
# What would give the credentials a project other than the metadata server's or --project.
PROJECT_VARIABLES = ("GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT")

# A catalog gone stale: every size wrong, every price old.
STALE = {
    "e2-standard-4": VmType("e2-standard-4", 2, 4, 0, False, 0.1),
    "t2a-standard-2": VmType("t2a-standard-2", 4, 8, 0, False, 0.5),
    "g2-standard-4": VmType("g2-standard-4", 4, 16, 0, False, 0.5),
}
# The stand-in's machine types as its on-demand us-central1 SKUs price them: vCPUs × the
# family's core rate + GiB × its RAM rate + GPUs × the GPU's rate, USD per hour.
FRESH = {
    # 4 × 0.021811 + 16 × 0.002923
    "e2-standard-4": {"vcpus": 4, "memory_gib": 16, "gpus": 0, "arm": False,
                      "on_demand": 0.134012},
    # 2 × 0.02888 + 8 × 0.00231 (T2A Arm)
    "t2a-standard-2": {"vcpus": 2, "memory_gib": 8, "gpus": 0, "arm": True,
                       "on_demand": 0.07624},
    # 4 × 0.024988 + 16 × 0.002927 + 1 × 0.560279 (one Nvidia L4)
    "g2-standard-4": {"vcpus": 4, "memory_gib": 16, "gpus": 1, "arm": False,
                      "on_demand": 0.707063},
}  # fmt: skip
# 2 × 0.021811 + 8 × 0.002923
E2_STANDARD_2 = {"vcpus": 2, "memory_gib": 8, "gpus": 0, "arm": False, "on_demand": 0.067006}


@pytest.fixture
def gce() -> Iterator[GceApi]:
    with GceApi(token=TOKEN) as api:
        yield api


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "gcp.json"
    path.write_text(dump(STALE, about="stale"))
    return path


def _refresh(
    gce: GceApi, catalog: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """The command, its SDKs pointed at the stand-in (its metadata server's credentials,
    unless ``env`` says otherwise); the token is in none of its output."""
    environment = {k: v for k, v in os.environ.items() if k not in PROJECT_VARIABLES}
    environment |= gce.env() | env
    done = run_cli(
        "launch", "catalog", "gcp", "--out", str(catalog), "--region", REGION, *args,
        env=environment, timeout=60,
    )  # fmt: skip
    assert TOKEN not in done.stdout + done.stderr
    return done


def _types(catalog: Path) -> dict[str, dict]:
    return json.loads(catalog.read_text())["types"]


def _authorized_user(tmp_path: Path, token: str) -> Path:
    """What `gcloud auth application-default login` writes (no project in it), its access
    token still valid: google-auth uses it without refreshing it at Google."""
    path = tmp_path / "adc.json"
    path.write_text(json.dumps({
        "type": "authorized_user", "client_id": "catalog-test.apps.googleusercontent.com",
        "client_secret": "unused", "refresh_token": "unused", "token": token,
        "expiry": "2099-01-01T00:00:00Z",
    }))  # fmt: skip
    return path


def test_sizes_come_from_the_machine_types_and_prices_from_the_on_demand_skus(gce, catalog):
    done = _refresh(gce, catalog, "--project", PROJECT)

    assert done.returncode == 0, done.stderr
    assert _types(catalog) == FRESH
    assert done.stdout.splitlines() == [
        f"reading 3 gcp types in {REGION}",
        "  e2-standard-4: now 4 vCPUs, 16 GiB, 0 GPUs, $0.134012/h",
        "  g2-standard-4: now 4 vCPUs, 16 GiB, 1 GPU, $0.707063/h",
        "  t2a-standard-2: now 2 vCPUs, 8 GiB, 0 GPUs, arm, $0.07624/h",
        f"wrote {catalog}: 3 types, 3 changed",
    ]
    about = json.loads(catalog.read_text())["about"]
    assert about.startswith(f"GCE on-demand Linux list prices, USD per hour, {REGION}, read on")
    # Every page of SKUs was read (the stand-in's are 5 long), each with the token.
    assert gce.requests.count(("GET", SKUS)) > 1


def test_add_and_drop_and_a_second_refresh_changes_nothing(gce, catalog):
    # No --project: the credentials' own (the metadata server's project)
    done = _refresh(gce, catalog, "--add", "e2-standard-2", "--drop", "t2a-standard-2")

    assert done.returncode == 0, done.stderr
    assert _types(catalog) == {
        "e2-standard-2": E2_STANDARD_2,
        "e2-standard-4": FRESH["e2-standard-4"],
        "g2-standard-4": FRESH["g2-standard-4"],
    }
    assert "  e2-standard-2: added (2 vCPUs, 8 GiB, 0 GPUs, $0.067006/h)" in done.stdout
    assert "t2a-standard-2" not in done.stdout

    written = catalog.read_text()
    again = _refresh(gce, catalog)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[1:] == [f"wrote {catalog}: 3 types, 0 changed"]
    assert catalog.read_text() == written


def test_an_unknown_type_is_named_and_the_catalog_kept(gce, catalog):
    before = catalog.read_text()

    done = _refresh(gce, catalog, "--add", "n9-huge-1")

    assert_one_error_line(done, 2, f"gcp offers no n9-huge-1 in {REGION}, or no on-demand price")
    assert catalog.read_text() == before


def test_a_family_with_only_decoy_skus_is_not_priced(gce, catalog):
    # n2's SKUs in the stand-in: custom, sole-tenant, spot, a commitment, another region.
    before = catalog.read_text()

    done = _refresh(gce, catalog, "--add", "n2-standard-2")

    assert_one_error_line(
        done,
        2,
        f"no on-demand price in {REGION} for n2-standard-2: Compute Engine's SKUs have no "
        "on-demand 'N2 Instance Core running in ...' per h there; --drop it",
    )
    assert catalog.read_text() == before


def test_two_on_demand_prices_for_one_sku_are_not_chosen_between(gce, catalog):
    gce.add_sku("E2 Instance Core running in Iowa", [REGION], 0.025, "h")
    before = catalog.read_text()

    done = _refresh(gce, catalog)

    says = (
        "for e2-standard-4: Compute Engine's SKUs have several on-demand 'E2 Instance Core "
        "running in ...' per h there ($0.021811, $0.025)"
    )
    assert_one_error_line(done, 2, says)
    assert catalog.read_text() == before


def test_without_a_project_it_says_to_pass_one(gce, catalog, tmp_path):
    credentials = str(_authorized_user(tmp_path, TOKEN))
    before = catalog.read_text()

    done = _refresh(gce, catalog, GOOGLE_APPLICATION_CREDENTIALS=credentials)

    assert_one_error_line(done, 2, "the credentials name none: pass --project PROJECT")
    assert catalog.read_text() == before and gce.requests == []
    # The same credentials with --project read the catalog.
    named = _refresh(gce, catalog, "--project", PROJECT, GOOGLE_APPLICATION_CREDENTIALS=credentials)
    assert named.returncode == 0, named.stderr
    assert _types(catalog) == FRESH


def test_refused_credentials_are_one_line(gce, catalog):
    gce.revoke_token()  # the metadata server hands out a token the APIs refuse
    before = catalog.read_text()

    done = _refresh(gce, catalog)

    assert_one_error_line(
        done, 2, f"reading the machine types of {REGION}: Google refused the credentials"
    )
    assert catalog.read_text() == before


def test_a_billing_endpoint_that_does_not_answer_is_one_line(gce, catalog):
    unreachable = unused_api_url().removesuffix("/api") + "/"

    done = _refresh(gce, catalog, CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDBILLING=unreachable)

    assert_one_error_line(
        done,
        3,
        f"reading Compute Engine's SKUs: could not reach {unreachable} (ConnectionError); "
        "check the network or CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDBILLING",
    )


def test_no_credentials_is_one_line(gce, catalog):
    nowhere = unused_api_url().removeprefix("http://").removesuffix("/api")

    done = _refresh(gce, catalog, GCE_METADATA_HOST=nowhere, GCE_METADATA_IP=nowhere)

    assert_one_error_line(done, 2, "found no usable GCP credentials")
    assert gce.requests == []
