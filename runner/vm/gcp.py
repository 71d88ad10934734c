"""GCE: the firmware's strings, the machine from the metadata server, and preemption."""

from __future__ import annotations

from functools import partial

from runner.vm.clouds import NoticeCheck
from runner.vm.metadata import Dmi, Machine, fetch

METADATA_URL = "http://metadata.google.internal"  # the metadata server (Metadata-Flavor: Google)
_HEADERS = {"Metadata-Flavor": "Google"}


def in_dmi(dmi: Dmi) -> bool:
    return "Google" in dmi.vendor


def machine(base: str) -> Machine:
    zone = _meta(base, "zone").rsplit("/", 1)[-1]  # projects/123/zones/us-central1-a
    model = _meta(base, "scheduling/provisioning-model")  # STANDARD | SPOT
    preemptible = _meta(base, "scheduling/preemptible")  # TRUE | FALSE
    return Machine(
        cloud="gcp",
        instance_id=_meta(base, "id"),
        region=zone.rsplit("-", 1)[0],
        instance_type=_meta(base, "machine-type").rsplit("/", 1)[-1],
        spot=model.upper() == "SPOT" or preemptible.upper() == "TRUE",
    )


def spot_notice(base: str) -> NoticeCheck:
    return partial(_preempted, base)


def _preempted(base: str) -> str | None:
    body = _meta(base, "preempted").strip().upper()
    if body == "TRUE":
        return "GCE preempted the instance"
    if body != "FALSE":
        raise ValueError(f"instance/preempted answered {body[:40]!r}")
    return None


def _meta(base: str, path: str) -> str:
    return fetch(f"{base}/computeMetadata/v1/instance/{path}", _HEADERS)
