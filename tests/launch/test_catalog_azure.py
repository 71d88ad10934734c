"""`python -m runner launch catalog azure` as users run it: the CLI in a subprocess, the
azure-mgmt SDK with DefaultAzureCredential (a managed-identity endpoint) reading the Resource
SKUs of the loopback ARM stand-in over TLS, and the prices from its Retail Prices stand-in,
which holds decoys (Windows, Spot, Low Priority, DevTest, reservations, other regions, a
non-primary meter) and refuses any request that carries credentials."""

from __future__ import annotations

import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.azure_api import LINUX_PRICES, RESTRICTED_SIZE, TOKEN, AzureApi
from devtools.server_process import free_port
from runner.launch.catalog import VmType, dump, load
from tests.helpers import assert_one_error_line, run_cli
from tests.planted import planted

REGION = "eastus"
D2S, D2PS, NC4 = "Standard_D2s_v5", "Standard_D2ps_v5", "Standard_NC4as_T4_v3"
# What the cloud says of them (the stand-in's SKUs and Linux pay-as-you-go meters).
FRESH = {
    D2S: VmType(D2S, 2, 8, 0, False, LINUX_PRICES[D2S]),
    D2PS: VmType(D2PS, 2, 8, 0, True, LINUX_PRICES[D2PS]),
    NC4: VmType(NC4, 4, 28, 1, False, LINUX_PRICES[NC4]),
}


@pytest.fixture
def api() -> Iterator[AzureApi]:
    with AzureApi() as api:
        yield api


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    """A catalog of three sizes, each wrong in size or architecture, all at stale prices."""
    path = tmp_path / "azure.json"
    stale = {
        D2S: VmType(D2S, 4, 8, 0, False, 0.5),
        D2PS: VmType(D2PS, 2, 8, 0, False, 0.5),
        NC4: VmType(NC4, 4, 28, 0, False, 0.5),
    }
    path.write_text(dump(stale, about="stale"))
    return path


def _refresh(api: AzureApi, *args: str, **env: str | None) -> subprocess.CompletedProcess[str]:
    """The command with the environment a worker on the stand-in gets (``env`` on top; None
    removes a variable), and no Azure credentials or subscription of this machine's own."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}
    environment.update(api.env())
    for name, value in env.items():
        environment.pop(name, None)
        if value is not None:
            environment[name] = value
    done = run_cli("launch", "catalog", "azure", *args, env=environment)
    for secret in (TOKEN, api.issued_token, api.identity_header):
        assert secret not in done.stdout + done.stderr
    assert not [request for request in api.prices.requests if request.authorized]
    return done


def test_a_refresh_reads_sizes_from_the_skus_and_linux_pay_as_you_go_prices(api, catalog):
    done = _refresh(api, "--out", str(catalog), "--project", api.subscription, "--region", REGION)

    assert done.returncode == 0, done.stderr
    assert load("azure", catalog) == FRESH
    assert done.stdout.splitlines() == [
        f"reading 3 azure types in {REGION}",
        f"  {D2PS}: now 2 vCPUs, 8 GiB, 0 GPUs, arm, $0.077/h",
        f"  {D2S}: now 2 vCPUs, 8 GiB, 0 GPUs, $0.096/h",
        f"  {NC4}: now 4 vCPUs, 28 GiB, 1 GPU, $0.526/h",
        f"wrote {catalog}: 3 types, 3 changed",
    ]
    assert "Azure pay-as-you-go Linux list prices, USD per hour, eastus" in catalog.read_text()
    # One query for the three sizes, its pages followed to the end.
    queries = [request.query for request in api.prices.requests]
    firsts = [query for query in queries if "$skip" not in query]
    assert len(firsts) == 1 and len(queries) > 1
    assert all(f"armSkuName eq '{name}'" in firsts[0]["$filter"][0] for name in FRESH)
    skus = f"/subscriptions/{api.subscription}/providers/Microsoft.Compute/skus"
    assert api.requests.count(("GET", skus)) > 1  # ARM's pages followed too

    again = _refresh(api, "--out", str(catalog), "--project", api.subscription)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == f"wrote {catalog}: 3 types, 0 changed"


def test_add_and_drop_with_the_subscription_from_the_environment(api, catalog):
    done = _refresh(
        api, "--out", str(catalog), "--add", "Standard_E4s_v5", "--drop", NC4,
        AZURE_SUBSCRIPTION_ID=api.subscription,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert sorted(load("azure", catalog) or {}) == [D2PS, D2S, "Standard_E4s_v5"]
    assert "  Standard_E4s_v5: added (4 vCPUs, 32 GiB, 0 GPUs, $0.252/h)" in done.stdout
    assert NC4 not in done.stdout


@pytest.mark.parametrize("size", ["Standard_Z99", RESTRICTED_SIZE])
def test_a_size_the_subscription_cannot_have_there_is_one_line_and_changes_nothing(
    api, catalog, size
):
    # Standard_Z99 does not exist; the other is listed, but not for this subscription.
    before = catalog.read_text()

    done = _refresh(api, "--out", str(catalog), "--project", api.subscription, "--add", size)

    assert_one_error_line(done, 2, f"azure offers no {size} in {REGION}, or no on-demand price")
    assert catalog.read_text() == before


def test_a_size_without_a_linux_price_is_one_line_even_with_its_decoys_listed(api, catalog):
    api.prices.withdraw_price(D2PS, REGION)  # its Spot and Low Priority meters stay
    before = catalog.read_text()

    done = _refresh(api, "--out", str(catalog), "--project", api.subscription)

    assert_one_error_line(
        done, 2, f"no Linux pay-as-you-go price for {D2PS} in {REGION}; --drop it"
    )
    assert catalog.read_text() == before


def test_two_differing_linux_prices_are_not_guessed_between(api, catalog):
    api.prices.add_price(NC4, REGION, 0.61)

    done = _refresh(api, "--out", str(catalog), "--project", api.subscription)

    assert_one_error_line(done, 2, f"2 differing Linux pay-as-you-go prices for {NC4} in {REGION}")


@pytest.mark.parametrize(
    ("project", "says"),
    [
        (None, "pass --project SUBSCRIPTION_ID (or set AZURE_SUBSCRIPTION_ID)"),
        ("00000000-0000-0000-0000-000000000000", "there is no subscription 00000000-0000-"),
    ],
)
def test_no_subscription_or_an_unknown_one_is_one_line(api, catalog, project, says):
    args = ["--project", project] if project else []

    done = _refresh(api, "--out", str(catalog), *args)

    assert_one_error_line(done, 2, says)


def test_refused_credentials_are_one_line_and_the_token_never_shows(api, catalog):
    api.issued_token = planted("azure-arm-token")  # the session's last check looks for it

    done = _refresh(api, "--out", str(catalog), "--project", api.subscription)

    assert_one_error_line(done, 2, "Azure refused the credentials (InvalidAuthenticationToken")


def test_no_credentials_at_all_are_one_line(api, catalog):
    # Only the environment's service principal may be tried (nothing on the network), and the
    # environment names none.
    done = _refresh(
        api, "--out", str(catalog), "--project", api.subscription,
        IDENTITY_ENDPOINT=None, IDENTITY_HEADER=None,
        AZURE_TOKEN_CREDENTIALS="EnvironmentCredential",
    )  # fmt: skip

    assert_one_error_line(
        done, 2, "no usable Azure credentials (a managed identity, AZURE_CLIENT_ID/"
    )


def test_an_unreachable_price_list_is_one_line(api, catalog):
    nowhere = f"https://127.0.0.1:{free_port()}"

    done = _refresh(
        api, "--out", str(catalog), "--project", api.subscription,
        RUNNER_AZURE_PRICES_ENDPOINT=nowhere,
    )  # fmt: skip

    assert_one_error_line(
        done, 3, f"cannot reach the Azure price list at {nowhere} (is RUNNER_AZURE_PRICES_"
    )


def test_the_stand_ins_are_strict_about_credentials_and_filters(api):
    import httpx

    verify = ssl.create_default_context(cafile=api.ca_file)
    prices = f"{api.prices_url}/api/retail/prices"
    skus = f"{api.url}/subscriptions/{api.subscription}/providers/Microsoft.Compute/skus"
    version = {"api-version": "2023-01-01-preview"}
    with httpx.Client(verify=verify) as http:
        with_token = http.get(prices, params=version, headers={"Authorization": f"Bearer {TOKEN}"})
        listed_in = http.get(prices, params={**version, "$filter": "armSkuName in ('a', 'b')"})
        other_case = http.get(prices, params={**version, "$filter": "armRegionName eq 'EastUS'"})
        old_version = http.get(prices, params={"$filter": "armRegionName eq 'EastUS'"})
        sku_filter = http.get(
            skus, params={"api-version": "2021-07-01", "$filter": "resourceType eq 'disks'"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )  # fmt: skip
        no_token = http.get(skus, params={"api-version": "2021-07-01"})

    assert with_token.status_code == 401
    assert listed_in.status_code == 400 and "Invalid OData" in listed_in.json()["Error"]["Message"]
    assert other_case.json()["Items"] == []  # 2023-01-01-preview's values are case-sensitive
    assert old_version.json()["Items"][0]["armRegionName"] == "eastus"
    assert old_version.json()["NextPageLink"].startswith(f"{prices}?$filter=")
    assert sku_filter.status_code == 400 and sku_filter.json()["error"]["code"] == "InvalidFilter"
    assert no_token.status_code == 401
