"""`python -m runner launch catalog aws` for real: the CLI in its own process, the real boto3,
EC2 from moto (its DescribeInstanceTypes is AWS's data) and the Price List Query API from a
loopback stand-in (devtools/aws_pricing_api.py) that holds each type's on-demand Linux
price among decoys (Windows, dedicated, reservations, other regions)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.aws_pricing_api import ACCESS_KEY, CONTENT_TYPE, DECOYS, TARGET, PricingApi
from devtools.server_process import free_port
from runner.launch.catalog import VmType, dump, load
from tests.helpers import assert_one_error_line, run_cli
from tests.planted import planted

SECRET = planted("aws-secret-access-key")
# type -> list price in us-east-1, in eu-west-1 (USD per hour)
PRICES = {
    "m6i.large": (0.096, 0.107),
    "m7g.large": (0.0816, 0.0892),
    "g4dn.xlarge": (0.526, 0.587),
    "c6i.large": (0.085, 0.096),
}
# What moto's EC2 says of them (AWS's own figures): vCPUs, GiB, NVIDIA GPUs, arm.
SIZES = {
    "m6i.large": (2, 8, 0, False),
    "m7g.large": (2, 8, 0, True),
    "g4dn.xlarge": (4, 16, 1, False),
    "c6i.large": (2, 4, 0, False),
}
# The catalog before the refresh: wrong sizes, stale prices.
STALE = {
    "m6i.large": VmType("m6i.large", 4, 16, 0, False, 0.5),
    "m7g.large": VmType("m7g.large", 2, 8, 0, False, 0.07),
    "g4dn.xlarge": VmType("g4dn.xlarge", 4, 16, 1, False, 0.6),
}


@pytest.fixture
def pricing() -> Iterator[PricingApi]:
    with PricingApi() as api:
        for name, (east, west) in PRICES.items():
            api.add(name, "us-east-1", east)
            api.add(name, "eu-west-1", west)
        yield api


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "aws.json"
    path.write_text(dump(STALE, about="stale"))
    return path


def _env(tmp_path: Path, moto, pricing: PricingApi, **overrides: str | None) -> dict[str, str]:
    """This process's environment without any AWS setting of the machine's: dummy keys,
    no config files, no instance metadata, EC2 on moto and the price list on the
    stand-in; ``overrides`` (None: unset)."""
    env: dict[str, str | None] = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ENDPOINT_URL_EC2=moto.url,
        AWS_ENDPOINT_URL_PRICING=pricing.url,
    )
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def _refresh(env: dict[str, str], catalog: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = run_cli("launch", "catalog", "aws", "--out", str(catalog), *args, env=env)
    assert SECRET not in done.stdout + done.stderr
    return done


def _expected(names: list[str], column: int = 0) -> dict[str, VmType]:
    return {name: VmType(name, *SIZES[name], PRICES[name][column]) for name in names}


def test_a_refresh_writes_ec2_sizes_and_list_prices(tmp_path, moto, pricing, catalog):
    done = _refresh(_env(tmp_path, moto, pricing), catalog)

    assert done.returncode == 0, done.stderr
    assert load("aws", catalog) == _expected(list(STALE))
    lines = done.stdout.splitlines()
    for name in STALE:  # each change named, with its new price
        [line] = [line for line in lines if line.strip().startswith(f"{name}:")]
        assert f"${PRICES[name][0]:g}/h" in line
    assert "m7g.large: now 2 vCPUs, 8 GiB, 0 GPUs, arm" in done.stdout
    assert '"about": "EC2 on-demand Linux list prices, USD per hour, us-east-1' in (
        catalog.read_text()
    )


def test_add_and_drop(tmp_path, moto, pricing, catalog):
    done = _refresh(
        _env(tmp_path, moto, pricing), catalog, "--add", "c6i.large", "--drop", "g4dn.xlarge"
    )

    assert done.returncode == 0, done.stderr
    assert load("aws", catalog) == _expected(["c6i.large", "m6i.large", "m7g.large"])
    assert "c6i.large: added (2 vCPUs, 4 GiB, 0 GPUs, $0.085/h)" in done.stdout


def test_another_region_gets_its_own_prices(tmp_path, moto, pricing, catalog):
    done = _refresh(_env(tmp_path, moto, pricing), catalog, "--region", "eu-west-1")

    assert done.returncode == 0, done.stderr
    assert load("aws", catalog) == _expected(list(STALE), column=1)
    assert ", eu-west-1, read on " in catalog.read_text()


def test_an_unknown_type_is_named_and_nothing_is_written(tmp_path, moto, pricing, catalog):
    before = catalog.read_text()

    done = _refresh(_env(tmp_path, moto, pricing), catalog, "--add", "m9.huge")

    line = assert_one_error_line(done, 2, "m9.huge")
    assert "m6i.large" not in line  # only the one EC2 does not know
    assert catalog.read_text() == before


def test_a_type_without_a_price_is_named_and_nothing_is_written(tmp_path, moto, pricing, catalog):
    before = catalog.read_text()

    done = _refresh(_env(tmp_path, moto, pricing), catalog, "--add", "m5.large")  # EC2 has it

    assert_one_error_line(done, 2, "m5.large")
    assert catalog.read_text() == before


def test_differing_prices_for_one_type_are_refused(tmp_path, moto, pricing, catalog):
    before = catalog.read_text()
    pricing.add("m7g.large", "us-east-1", 0.09, decoys=False)  # a second, other price

    done = _refresh(_env(tmp_path, moto, pricing), catalog)

    assert_one_error_line(done, 2, "several on-demand Linux prices for m7g.large in us-east-1")
    assert catalog.read_text() == before


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        pytest.param(
            {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
            "ec2:DescribeInstanceTypes: no AWS credentials",
            id="no-credentials",
        ),
        pytest.param(
            {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNTOTHEAPI0"},  # moto takes any, the price list not
            "pricing:GetProducts: AWS refused the credentials (UnrecognizedClientException",
            id="refused-credentials",
        ),
    ],
)
def test_what_the_user_must_fix_is_one_line(tmp_path, moto, pricing, catalog, overrides, says):
    before = catalog.read_text()

    done = _refresh(_env(tmp_path, moto, pricing, **overrides), catalog)

    assert_one_error_line(done, 2, says)
    assert catalog.read_text() == before


def test_an_unreachable_api_is_one_line(tmp_path, moto, pricing, catalog):
    nobody = f"http://127.0.0.1:{free_port()}"

    done = _refresh(_env(tmp_path, moto, pricing, AWS_ENDPOINT_URL_EC2=nobody), catalog)

    assert_one_error_line(
        done, 3, f'ec2:DescribeInstanceTypes: Could not connect to the endpoint URL: "{nobody}/"'
    )


def test_the_stand_in_refuses_what_the_real_api_refuses(pricing):
    """The stand-in is only worth its strictness: a request the real API refuses gets the
    real API's error document, so the source cannot pass here and fail there."""
    scope = "testing/20250101/us-east-1/pricing/aws4_request"
    signed = {
        "Authorization": f"AWS4-HMAC-SHA256 Credential={scope}, "
        f"SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature={'0' * 64}",
        "X-Amz-Date": "20250101T000000Z",
        "X-Amz-Target": TARGET,
        "Content-Type": CONTENT_TYPE,
    }
    query = {"Type": "TERM_MATCH", "Field": "instanceType", "Value": "m6i.large"}
    good = {"ServiceCode": "AmazonEC2", "Filters": [query], "MaxResults": 100}
    other_region = signed["Authorization"].replace("us-east-1", "eu-west-1")
    cases = [
        ({"Authorization": ""}, good, "MissingAuthenticationTokenException"),
        ({"Authorization": other_region}, good, "InvalidSignatureException"),
        ({"X-Amz-Target": "AWSPriceListService.GetServices"}, good, "UnknownOperationException"),
        ({}, {**good, "Region": "us-east-1"}, "SerializationException"),
        ({}, {**good, "ServiceCode": "AmazonS3"}, "InvalidParameterException"),
        ({}, {**good, "Filters": [{**query, "Type": "EQUALS"}]}, "InvalidParameterException"),
        ({}, {**good, "NextToken": "not-a-token"}, "InvalidNextTokenException"),
    ]
    for headers, body, error in cases:
        sent = {k: v for k, v in {**signed, **headers}.items() if v}
        answer = httpx.post(pricing.url, headers=sent, content=json.dumps(body))
        assert (answer.status_code, answer.json()["__type"]) == (400, error), (headers, body)

    pages, token = [], None
    while True:
        answer = httpx.post(
            pricing.url, headers=signed, json={**good, "NextToken": token} if token else good
        )
        pages.append(answer.json()["PriceList"])
        if not (token := answer.json().get("NextToken")):
            break
    products = [json.loads(item) for page in pages for item in page]
    assert len(pages) > 1 and [] in pages  # paged, and a page may hold no match
    assert len(products) == 2 * (1 + len(DECOYS))  # both regions, with their decoys
