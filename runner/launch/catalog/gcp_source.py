"""The gcp catalog source: GCE machine types' sizes, priced from Cloud Billing's SKUs."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any

from runner.errors import ConfigError
from runner.launch.catalog import VmType
from runner.launch.providers.gcp import (
    CLOUD_PLATFORM,
    ENDPOINT_VARIABLE,
    api_endpoint,
    compute_sdk,
    google_errors,
)

DEFAULT_REGION = "us-central1"
ABOUT = "GCE on-demand Linux list prices, USD per hour"

# Compute Engine's service in the Cloud Billing Catalog (services.skus.list's own example).
SERVICE = "6F81-5844-456A"
# gcloud's override of the Cloud Billing endpoint (`gcloud config set
# api_endpoint_overrides/cloudbilling URL`, as an environment variable), as the provider
# takes CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE for Compute Engine.
BILLING_VARIABLE = "CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDBILLING"
BILLING_ENDPOINT = "https://cloudbilling.googleapis.com/"
COMPUTE_ENDPOINT = "https://compute.googleapis.com/compute/v1/"
TIMEOUT = 60.0  # seconds for one page of SKUs: a person waits on this command

# GCE bills a predefined machine type as its vCPUs at its family's core rate plus its GiB
# at the family's RAM rate, plus each attached GPU at the GPU's rate. Each family's SKUs
# read "<words> Core running in <place>" (per vCPU hour) and "<words> Ram running in
# <place>" (per GiB hour); the place ("Americas", "Iowa") says little, the SKU's
# serviceRegions say where it applies. A family not here is not priced: its SKUs' words
# are not guessed ("N2D AMD Instance", "Compute optimized" for c2...).
FAMILIES = {
    "e2": "E2 Instance",
    "n2": "N2 Instance",
    "c3": "C3 Instance",
    "t2a": "T2A Arm Instance",
    "g2": "G2 Instance",
    "a2": "A2 Instance",  # a2-highgpu; a2-ultragpu's A100 80GB is not in GPUS
}
# A machine type's accelerator -> its SKU's words: "<words> running in <place>", per hour.
GPUS = {"nvidia-l4": "Nvidia L4 GPU", "nvidia-tesla-a100": "Nvidia Tesla A100 GPU"}
# Only "<words> running in <place>" is the on-demand list price of the words. Other SKUs
# of a family read otherwise: "Spot Preemptible N2 Instance Core running in ...", "N2 Custom
# Instance Core ...", "N2 Sole Tenancy Instance Core ...", "Commitment v1: N2 Cpu in ...",
# "Nvidia L4 GPU attached to Spot Preemptible VMs running in ...". usageType (OnDemand,
# Preemptible, Commit1Yr...) says it too; both are checked.
_ON_DEMAND = re.compile(r"(?P<words>.+?) running in \S.*")
_PER_HOUR, _PER_GIB_HOUR = "h", "GiBy.h"  # the pricingExpression's usageUnit


def read(names: Sequence[str], *, region: str, project: str | None) -> dict[str, VmType]:
    """Each named machine type a zone of ``region`` has, priced from the SKUs that apply
    in ``region``; ConfigError naming the types it has but that cannot be priced."""
    compute = compute_sdk("the gcp catalog")
    credentials, project = _credentials(project)
    # Read here, once: gcloud's overrides, for a private endpoint or a stand-in.
    compute_override = os.environ.get(ENDPOINT_VARIABLE)
    compute_url = compute_override or COMPUTE_ENDPOINT
    billing_url = os.environ.get(BILLING_VARIABLE) or BILLING_ENDPOINT
    options = {"api_endpoint": api_endpoint(compute_override)} if compute_override else None
    clients = {"credentials": credentials, "transport": "rest", "client_options": options}
    with google_errors(f"reading the machine types of {region}", compute_url, ENDPOINT_VARIABLE):
        sizes = _sizes(
            compute.RegionsClient(**clients), compute.MachineTypesClient(**clients),
            project=project, region=region, names=names,
        )  # fmt: skip
    if not sizes:
        return {}  # nothing to price: refresh names what is missing
    with google_errors("reading Compute Engine's SKUs", billing_url, BILLING_VARIABLE):
        rates = _rates(_skus(credentials, _billing_root(billing_url)), region)
    types, unpriced = {}, []
    for name, machine_type in sizes.items():
        price = _price(machine_type, rates)
        if isinstance(price, str):
            unpriced.append(f"for {name}: {price}")
        else:
            types[name] = _vm_type(machine_type, price)
    if unpriced:
        them = "it" if len(unpriced) == 1 else "them"
        raise ConfigError(f"no on-demand price in {region} {'; '.join(unpriced)}; --drop {them}")
    return types


def _credentials(project: str | None) -> tuple[Any, str]:
    """Application Default Credentials, as the provider reads them, and ``project`` or
    else theirs."""
    import google.auth

    # google-auth warns on stderr when it finds no project, and of each failed try of the
    # metadata server: what is missing is said here, in one line.
    quiet = logging.getLogger("google.auth")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with google_errors("reading the GCP credentials", "Google's auth service", None):
            credentials, default_project = google.auth.default(scopes=[CLOUD_PLATFORM])
    finally:
        quiet.setLevel(level)
    project = project or default_project
    if not project:
        raise ConfigError(
            "the gcp catalog reads machine types in a project, and the credentials name "
            "none: pass --project PROJECT (or set GOOGLE_CLOUD_PROJECT)"
        )
    return credentials, project


def _sizes(
    regions: Any, machine_types: Any, *, project: str, region: str, names: Sequence[str]
) -> dict[str, Any]:
    """The named machine types of the first zone of ``region`` that has each; the ones
    none has are left out. (Zones of a region offer different types: no zone is assumed.)"""
    wanted, found = set(names), {}
    zones = sorted(
        zone.rsplit("/", 1)[-1] for zone in regions.get(project=project, region=region).zones
    )
    for zone in zones:
        for machine_type in machine_types.list(project=project, zone=zone):  # every page
            if machine_type.name in wanted:
                found.setdefault(machine_type.name, machine_type)
        if wanted <= set(found):
            break
    return found


def _billing_root(url: str) -> str:
    """The Cloud Billing root URL from gcloud's override (``https://host/``; the API's
    version is in the path, added here)."""
    return re.sub(r"/v1/?$", "", url.strip()).rstrip("/")


def _skus(credentials: Any, root: str) -> Iterator[dict[str, Any]]:
    """Every SKU of Compute Engine, page after page (services.skus.list)."""
    from google.api_core.exceptions import from_http_response
    from google.auth.transport.requests import AuthorizedSession

    session = AuthorizedSession(credentials)
    params = {"currencyCode": "USD", "pageSize": "5000"}
    while True:
        response = session.get(f"{root}/v1/services/{SERVICE}/skus", params=params, timeout=TIMEOUT)
        if response.status_code != 200:
            raise from_http_response(response)
        page = response.json()
        yield from page.get("skus", [])
        if not page.get("nextPageToken"):
            return
        params["pageToken"] = page["nextPageToken"]


def _rates(skus: Iterable[dict[str, Any]], region: str) -> dict[tuple[str, str], set[Decimal]]:
    """(words, usage unit) -> the USD rates of the on-demand SKUs of those words that apply
    in ``region`` (several rates: the catalog does not choose)."""
    rates: dict[tuple[str, str], set[Decimal]] = {}
    for sku in skus:
        category = sku.get("category", {})
        match = _ON_DEMAND.fullmatch(sku.get("description", ""))
        if (
            match is None
            or category.get("resourceFamily") != "Compute"
            or category.get("usageType") != "OnDemand"
            or region not in sku.get("serviceRegions", [])
            or not sku.get("pricingInfo")
        ):
            continue
        # The latest of the timeline (the one listed without startTime), its first tier:
        # the rate from the first hour.
        expression = sku["pricingInfo"][-1]["pricingExpression"]
        tiers = sorted(
            expression.get("tieredRates", []), key=lambda t: t.get("startUsageAmount", 0)
        )
        if not tiers:
            continue
        price = tiers[0].get("unitPrice", {})
        if price.get("currencyCode", "USD") != "USD":
            continue
        usd = Decimal(price.get("units") or 0) + Decimal(price.get("nanos") or 0) / 10**9
        key = (match["words"], expression.get("usageUnit", ""))
        rates.setdefault(key, set()).add(usd)
    return rates


def _price(machine_type: Any, rates: dict[tuple[str, str], set[Decimal]]) -> Decimal | str:
    """The machine type's on-demand USD per hour; else why there is none."""
    family = machine_type.name.split("-", 1)[0]
    if family not in FAMILIES:
        return f"the catalog prices the families {', '.join(FAMILIES)}, not {family}"
    if machine_type.is_shared_cpu:
        return "a shared-core type, billed a fraction of its vCPUs"
    if machine_type.bundled_local_ssds.partition_count:
        return "its bundled local SSD is billed apart"
    # (the SKU's words, its usage unit, how many units an hour of the machine uses)
    parts = [
        (f"{FAMILIES[family]} Core", _PER_HOUR, Decimal(machine_type.guest_cpus)),
        (f"{FAMILIES[family]} Ram", _PER_GIB_HOUR, Decimal(machine_type.memory_mb) / 1024),
    ]
    for accelerator in machine_type.accelerators:
        kind = accelerator.guest_accelerator_type
        if kind not in GPUS:
            return f"the catalog prices the GPUs {', '.join(GPUS)}, not {kind}"
        parts.append((GPUS[kind], _PER_HOUR, Decimal(accelerator.guest_accelerator_count)))
    total = Decimal(0)
    for words, unit, amount in parts:
        found = rates.get((words, unit), set())
        if len(found) != 1:  # none, or several that differ: no guess either way
            listed = f" ({', '.join(f'${rate:f}' for rate in sorted(found))})" if found else ""
            return (
                f"Compute Engine's SKUs have {'several' if found else 'no'} on-demand "
                f"'{words} running in ...' per {unit} there{listed}"
            )
        [rate] = found
        total += amount * rate
    return total


def _vm_type(machine_type: Any, price: Decimal) -> VmType:
    gib = machine_type.memory_mb / 1024
    return VmType(
        name=machine_type.name,
        vcpus=machine_type.guest_cpus,
        # 16, not 16.0: the catalog file keeps whole GiB whole, so a refresh's diff is quiet
        memory_gib=int(gib) if gib.is_integer() else gib,
        gpus=sum(
            accelerator.guest_accelerator_count
            for accelerator in machine_type.accelerators
            if accelerator.guest_accelerator_type.startswith("nvidia-")  # the runner's GPUs
        ),
        arm=machine_type.architecture == "ARM64",
        on_demand=float(price),
    )
