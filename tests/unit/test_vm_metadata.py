"""Which machine this is: DMI picks the cloud, the cloud's metadata service (a loopback
stand-in speaking each protocol) says the rest; off-cloud or unreachable is "unknown"."""

from __future__ import annotations

import socket

import pytest

from devtools.metadata_servers import AWS_RESOURCE, AZURE, MetadataServer
from devtools.server_process import free_port
from runner.vm.metadata import cloud_from_dmi, detect


@pytest.fixture(scope="module")
def imds():
    with MetadataServer() as server:
        yield server


def _urls(url: str) -> dict[str, str]:
    return {"aws": url, "gcp": url, "azure": url}


def test_aws_imdsv2_with_its_token(imds):
    machine = detect(cloud="aws", urls=_urls(imds.url))

    assert machine.resource() == AWS_RESOURCE
    assert ("PUT", "/latest/api/token") in imds.requests


def test_gce():
    with MetadataServer() as imds:
        machine = detect(cloud="gcp", urls=_urls(imds.url))

    assert (machine.cloud, machine.region, machine.instance_type, machine.spot) == (
        "gcp", "us-central1", "n2-standard-4", False
    )  # fmt: skip


def test_azure(imds):
    machine = detect(cloud="azure", urls=_urls(imds.url))

    assert machine.instance_id == AZURE["compute"]["vmId"]
    assert (machine.region, machine.instance_type, machine.spot) == (
        "westeurope", "Standard_D4s_v5", True
    )  # fmt: skip


def test_unreachable_or_off_cloud_is_unknown():
    dead = f"http://127.0.0.1:{free_port()}"

    for cloud in ("aws", "none"):
        machine = detect(cloud=cloud, urls=_urls(dead))
        assert machine.cloud == "unknown" and machine.instance_id == socket.gethostname()
        assert machine.resource()["spot"] == "unknown"


@pytest.mark.parametrize(
    ("files", "cloud"),
    [
        ({"sys_vendor": "Amazon EC2", "bios_vendor": "Amazon EC2"}, "aws"),
        ({"sys_vendor": "Google", "product_name": "Google Compute Engine"}, "gcp"),
        (
            {"sys_vendor": "Microsoft Corporation",
             "chassis_asset_tag": "7783-7084-3265-9085-8269-3286-77"},
            "azure",
        ),
        ({"sys_vendor": "Microsoft Corporation", "product_name": "Surface"}, "none"),
        ({"sys_vendor": "QEMU"}, "none"),
        ({}, "none"),
    ],
)  # fmt: skip
def test_dmi_names_the_cloud(tmp_path, files, cloud):
    for name, text in files.items():
        (tmp_path / name).write_text(text + "\n")

    assert cloud_from_dmi(tmp_path) == cloud
