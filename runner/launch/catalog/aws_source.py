"""The aws catalog source: sizes from EC2's DescribeInstanceTypes, on-demand Linux prices
from the AWS Price List Query API's GetProducts."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from runner.errors import ConfigError, MissingDependency
from runner.launch.catalog import VmType
from runner.launch.providers.aws import aws_errors

DEFAULT_REGION = "us-east-1"
ABOUT = "EC2 on-demand Linux list prices, USD per hour"

# The Price List Query API has endpoints in us-east-1, eu-central-1 and ap-south-1 only;
# each holds every region's prices (the regionCode filter picks one).
PRICING_REGION = "us-east-1"
# EC2 limits how many values one filter takes: the sizes are asked in batches.
BATCH = 100
# What makes a product "the" on-demand Linux price of a type: not Windows or RHEL, no SQL
# Server or other software on it, no license in the price, shared tenancy (not dedicated
# or host), capacity in use (not an unused reservation), on demand (Karpenter's price
# reader asks the same), in the region itself (not one of its Local Zones).
PRODUCT = {
    "operatingSystem": "Linux",
    "preInstalledSw": "NA",
    "licenseModel": "No License required",
    "tenancy": "Shared",
    "capacitystatus": "Used",
    "marketoption": "OnDemand",
    "locationType": "AWS Region",
}
_INSTALL = "pip install 'prefect-vm-runner[launch-aws]'"


def read(names: Sequence[str], *, region: str, project: str | None) -> dict[str, VmType]:
    """Each named type EC2 has in ``region`` that has an on-demand Linux list price
    there; ``project`` is not used (the credentials name the account)."""
    ec2, pricing = _clients(region)
    with aws_errors("ec2:DescribeInstanceTypes", region):
        sizes = _sizes(ec2, names)
    types = {}
    with aws_errors("pricing:GetProducts"):
        for name, size in sizes.items():
            price = _price(pricing, name, region)
            if price is not None:
                types[name] = dataclasses.replace(size, on_demand=price)
    return types


def _clients(region: str) -> tuple[Any, Any]:
    """EC2 in ``region`` and the Price List API, with boto3's usual credentials and
    endpoints (``AWS_ENDPOINT_URL_EC2``, ``AWS_ENDPOINT_URL_PRICING``)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise MissingDependency(f"the aws catalog needs boto3: {_INSTALL}") from None
    # Few retries and short timeouts: a person waits on this command.
    config = Config(
        retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60
    )
    session = boto3.session.Session()
    with aws_errors("connecting", region):
        return (
            session.client("ec2", region_name=region, config=config),
            session.client("pricing", region_name=PRICING_REGION, config=config),
        )


def _sizes(ec2: Any, names: Sequence[str]) -> dict[str, VmType]:
    """The named types EC2 knows, their price still 0."""
    wanted, sizes = set(names), {}
    paginator = ec2.get_paginator("describe_instance_types")
    for start in range(0, len(names), BATCH):
        # A filter, not InstanceTypes=[...]: one unknown name there fails the whole call
        # (InvalidInstanceType), where a filter leaves it out for refresh to name.
        batch = [{"Name": "instance-type", "Values": list(names[start : start + BATCH])}]
        for page in paginator.paginate(Filters=batch):
            for info in page["InstanceTypes"]:
                if info["InstanceType"] in wanted:  # a filter value may be a wildcard
                    sizes[info["InstanceType"]] = _size(info)
    return sizes


def _size(info: dict[str, Any]) -> VmType:
    gpus = sum(
        gpu.get("Count", 0)
        for gpu in info.get("GpuInfo", {}).get("Gpus", [])
        if gpu.get("Manufacturer") == "NVIDIA"  # the catalog counts NVIDIA GPUs (its about)
    )
    gib = info["MemoryInfo"]["SizeInMiB"] / 1024
    return VmType(
        name=info["InstanceType"],
        vcpus=info["VCpuInfo"]["DefaultVCpus"],
        # 16, not 16.0: the catalog file keeps whole GiB whole, so a refresh's diff is quiet
        memory_gib=int(gib) if gib.is_integer() else gib,
        gpus=gpus,
        arm="arm64" in info["ProcessorInfo"]["SupportedArchitectures"],
        on_demand=0.0,
    )


def _price(pricing: Any, name: str, region: str) -> float | None:
    """The on-demand Linux price of ``name`` in ``region``, USD per hour; None if the
    price list has none; ConfigError if it has several that differ."""
    match = {"instanceType": name, "regionCode": region, **PRODUCT}
    filters = [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in match.items()]
    prices: set[float] = set()
    pages = pricing.get_paginator("get_products").paginate(
        ServiceCode="AmazonEC2", Filters=filters, FormatVersion="aws_v1"
    )
    for page in pages:  # follows NextToken: a page may hold few or none of the matches
        for item in page["PriceList"]:
            prices |= _on_demand(json.loads(item))
    if len(prices) > 1:
        listed = ", ".join(f"${price:g}/h" for price in sorted(prices))
        raise ConfigError(
            f"the AWS price list has several on-demand Linux prices for {name} in {region} "
            f"({listed}) and the catalog takes no guess: --drop {name}"
        )
    return prices.pop() if prices else None


def _on_demand(product: dict[str, Any]) -> set[float]:
    """The hourly USD rates of a price-list product's on-demand terms (its reserved
    terms are other prices). A $0 rate is no list price: Karpenter's reader skips them too."""
    rates = (
        dimension
        for term in product.get("terms", {}).get("OnDemand", {}).values()
        for dimension in term.get("priceDimensions", {}).values()
        if dimension.get("unit") == "Hrs"
    )
    prices = {float(rate.get("pricePerUnit", {}).get("USD", 0)) for rate in rates}
    return prices - {0.0}
