"""The azure catalog source: sizes from ARM's Resource SKUs, prices from the Retail Prices API."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from runner.errors import BootstrapError, ConfigError, MissingDependency
from runner.launch.catalog import VmType
from runner.launch.providers.azure import (
    ARM_ENDPOINT,
    ARM_ENDPOINT_ENV,
    INSTALL,
    _first_line,
    arm_errors,
    default_credential,
)

DEFAULT_REGION = "eastus"
ABOUT = "Azure pay-as-you-go Linux list prices, USD per hour"
SUBSCRIPTION_ENV = "AZURE_SUBSCRIPTION_ID"  # what the az CLI and the SDK samples use
# Sizes come from ARM with the azure provider's credentials (DefaultAzureCredential) and
# endpoint (RUNNER_AZURE_ARM_ENDPOINT). Prices come from the public, unauthenticated Retail
# Prices API; RUNNER_AZURE_PRICES_ENDPOINT points at another (a mirror, a test stand-in). It
# never gets the ARM token: its client has no credential at all.
PRICES_ENDPOINT = "https://prices.azure.com"
PRICES_ENDPOINT_ENV = "RUNNER_AZURE_PRICES_ENDPOINT"
# The version with the full set of meters; its filter values are case-sensitive.
PRICES_API_VERSION = "2023-01-01-preview"
# Sizes per price query: one query for a usual catalog, and a URL far below any length limit.
SIZES_PER_QUERY = 25
RETRIES = 3  # a refresh is run by hand: a dead endpoint should say so soon


def read(names: Sequence[str], *, region: str, project: str | None) -> dict[str, VmType]:
    """Each of ``names`` that subscription ``project`` may use in location ``region``, with its
    Linux pay-as-you-go list price."""
    subscription = project or os.environ.get(SUBSCRIPTION_ENV)
    if not subscription:
        raise ConfigError(
            "the azure catalog reads the VM sizes with a subscription: pass --project "
            f"SUBSCRIPTION_ID (or set {SUBSCRIPTION_ENV})"
        )
    location = region.replace(" ", "").lower()  # "East US" is eastus to ARM and the price list
    arm = (os.environ.get(ARM_ENDPOINT_ENV) or ARM_ENDPOINT).rstrip("/")
    prices = (os.environ.get(PRICES_ENDPOINT_ENV) or PRICES_ENDPOINT).rstrip("/")
    sizes = _sizes(set(names), location, subscription=subscription, endpoint=arm)
    hourly = _prices(sorted(sizes), location, endpoint=prices)
    if unpriced := [name for name in sorted(sizes) if name not in hourly]:
        raise ConfigError(
            f"the Azure price list at {prices} has no Linux pay-as-you-go price for "
            f"{', '.join(unpriced)} in {location}; --drop it or choose another --region"
        )
    return {
        name: VmType(name, vcpus, memory, gpus, arm_cpu, hourly[name])
        for name, (vcpus, memory, gpus, arm_cpu) in sizes.items()
    }


# -- sizes: ARM's Resource SKUs -------------------------------------------------------------


def _sizes(
    wanted: set[str], location: str, *, subscription: str, endpoint: str
) -> dict[str, tuple[int, float, int, bool]]:
    """name -> (vCPUs, GiB, GPUs, arm) of each wanted size the subscription may use there."""
    try:
        from azure.mgmt.compute import ComputeManagementClient
    except ImportError:
        raise MissingDependency(f"the azure catalog needs azure-mgmt-compute: {INSTALL}") from None
    # The credential chain also logs every credential it tried, many lines, and with no
    # handler of azure's own Python prints them to stderr: the one error line says enough.
    azure_logs = logging.getLogger("azure")
    if not azure_logs.handlers:
        azure_logs.addHandler(logging.NullHandler())
    found: dict[str, tuple[int, float, int, bool]] = {}
    doing = f"listing the VM sizes of subscription {subscription} in {location}"
    with (
        arm_errors(doing, subscription=subscription, endpoint=endpoint),
        default_credential("the azure catalog") as credential,
        ComputeManagementClient(
            credential,
            subscription,
            base_url=endpoint,
            credential_scopes=[f"{endpoint}/.default"],
            retry_total=RETRIES,
        ) as compute,
    ):
        # The list takes no filter but the location (the SDK says so): the sizes are picked
        # here, from every SKU of the location.
        for sku in compute.resource_skus.list(filter=f"location eq {_literal(location)}"):
            if sku.resource_type != "virtualMachines" or sku.name not in wanted:
                continue
            if _not_for_subscription(sku, location):
                continue
            found[sku.name] = _size(sku)
    return found


def _not_for_subscription(sku: Any, location: str) -> bool:
    """ARM lists a size the subscription may not use in the location, with this restriction
    on the whole location (not only some zones): a VM of it is refused, so the catalog must
    not offer it."""
    for restriction in sku.restrictions or []:
        if (
            restriction.type != "Location"
            or restriction.reason_code != "NotAvailableForSubscription"
        ):
            continue
        info = restriction.restriction_info
        where = [place.lower() for place in (info.locations if info else None) or [location]]
        if location in where:
            return True
    return False


def _size(sku: Any) -> tuple[int, float, int, bool]:
    capabilities = {c.name: c.value for c in sku.capabilities or [] if c.name}
    try:
        vcpus = int(capabilities["vCPUs"])
        memory = float(capabilities["MemoryGB"])
        gpus = int(float(capabilities.get("GPUs") or 0))
    except (KeyError, ValueError):
        raise BootstrapError(
            f"ARM lists {sku.name} without a usable vCPUs, MemoryGB or GPUs capability"
        ) from None
    arm = capabilities.get("CpuArchitectureType", "").lower() == "arm64"
    # MemoryGB is GiB; a whole number is written as one, as in the catalog file.
    return vcpus, int(memory) if memory.is_integer() else memory, gpus, arm


# -- prices: the Azure Retail Prices API ----------------------------------------------------


def _prices(names: Sequence[str], location: str, *, endpoint: str) -> dict[str, float]:
    """name -> the Linux pay-as-you-go USD price per hour, for those the price list has."""
    if not names:
        return {}
    from azure.core import PipelineClient
    from azure.core.pipeline.policies import RetryPolicy

    candidates: dict[str, list[dict[str, Any]]] = {}
    # No credential policy: this client cannot send a token, whatever the environment holds.
    with PipelineClient(base_url=endpoint, policies=[RetryPolicy(retry_total=RETRIES)]) as client:
        for start in range(0, len(names), SIZES_PER_QUERY):
            chunk = names[start : start + SIZES_PER_QUERY]
            for item in _items(client, endpoint, _query(chunk, location)):
                if item.get("armSkuName") in chunk and _linux_pay_as_you_go(item, location):
                    candidates.setdefault(item["armSkuName"], []).append(item)
    return {name: _one_price(name, location, items) for name, items in candidates.items()}


def _query(names: Sequence[str], location: str) -> str:
    # Parenthesised: without them, `... and a or b` leaves b unfiltered by region and type.
    sizes = " or ".join(f"armSkuName eq {_literal(name)}" for name in names)
    where = (
        f"serviceName eq 'Virtual Machines' and priceType eq 'Consumption' "
        f"and armRegionName eq {_literal(location)} and ({sizes})"
    )
    return urlencode(
        {"api-version": PRICES_API_VERSION, "$filter": where}, quote_via=quote, safe="$'"
    )


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"  # OData's string literal


def _items(client: Any, endpoint: str, query: str) -> Iterator[dict[str, Any]]:
    """Every item the query finds, page after page (each names the next)."""
    from azure.core.exceptions import AzureError, ServiceRequestError
    from azure.core.rest import HttpRequest

    url: str | None = f"{endpoint}/api/retail/prices?{query}"
    while url:
        try:
            response = client.send_request(HttpRequest("GET", url))
        except ServiceRequestError as exc:
            raise BootstrapError(
                f"cannot reach the Azure price list at {endpoint} (is {PRICES_ENDPOINT_ENV} "
                f"right?): {_first_line(str(exc))}"
            ) from None
        except AzureError as exc:
            raise BootstrapError(
                f"reading the Azure price list at {endpoint}: {_first_line(str(exc))}"
            ) from None
        try:
            page = response.json()
        except ValueError:
            page = None
        if response.status_code != 200 or not isinstance(page, dict):
            raise BootstrapError(
                f"the Azure price list at {endpoint} answered {response.status_code}: "
                f"{_price_error(page, response)}"
            )
        yield from page.get("Items") or []
        url = page.get("NextPageLink")


def _linux_pay_as_you_go(item: dict[str, Any], location: str) -> bool:
    """The item is the on-demand Linux price of its size in ``location``: not Windows (whose
    meters name it in the product), not Spot or Low Priority (in the sku name), not a
    reservation or DevTest rate (the type), and per hour."""
    return (
        item.get("armRegionName") == location
        and item.get("serviceName") == "Virtual Machines"
        and item.get("type") == "Consumption"
        and item.get("unitOfMeasure") == "1 Hour"
        and item.get("currencyCode", "USD") == "USD"
        and "Windows" not in str(item.get("productName", ""))
        and not str(item.get("skuName", "")).endswith((" Spot", " Low Priority"))
        and isinstance(item.get("retailPrice"), (int, float))
    )


def _one_price(name: str, location: str, items: list[dict[str, Any]]) -> float:
    """The price the items agree on. A meter of its primary region is the size's own; the
    others (listed since 2023-01-01-preview) count only when there is no primary one. Any
    disagreement left is for a person to settle, not for a guess."""
    primary = [item for item in items if item.get("isPrimaryMeterRegion") is not False]
    prices = sorted({float(item["retailPrice"]) for item in primary or items})
    if len(prices) > 1:
        raise ConfigError(
            f"the Azure price list has {len(prices)} differing Linux pay-as-you-go prices for "
            f"{name} in {location} ({', '.join(f'${price:g}/h' for price in prices)}); set "
            "its price in the catalog by hand, or --drop it"
        )
    return prices[0]


def _price_error(page: Any, response: Any) -> str:
    error = page.get("Error") if isinstance(page, dict) else None
    if isinstance(error, dict):
        return f"{error.get('Code')}: {_first_line(str(error.get('Message')))}"
    return _first_line(response.text()[:200]) or str(response.reason)
