"""Azure: the firmware's strings, the machine from IMDS, and Scheduled Events' Preempt."""

from __future__ import annotations

import json
import logging
from typing import Any

from runner.vm.clouds import NoticeCheck
from runner.vm.metadata import Dmi, Machine, fetch

log = logging.getLogger("runner")

METADATA_URL = "http://169.254.169.254"  # IMDS and Scheduled Events (Metadata: true)
_HEADERS = {"Metadata": "true"}
_INSTANCE_API_VERSION = "2021-02-01"
_EVENTS_API_VERSION = "2020-07-01"
# Hyper-V and Surface machines say "Microsoft Corporation" too; this tag is Azure's alone.
_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"


def in_dmi(dmi: Dmi) -> bool:
    return "Microsoft Corporation" in dmi.vendor and dmi["chassis_asset_tag"] == _ASSET_TAG


def machine(base: str) -> Machine:
    compute = _instance(base)["compute"]
    return Machine(
        cloud="azure",
        instance_id=compute["vmId"],
        region=compute["location"],
        instance_type=compute["vmSize"],
        spot=compute.get("priority", "").lower() in ("spot", "low"),
    )


def _instance(base: str) -> dict[str, Any]:
    url = f"{base}/metadata/instance?api-version={_INSTANCE_API_VERSION}"
    return json.loads(fetch(url, _HEADERS))


def spot_notice(base: str) -> NoticeCheck:
    return _SpotNotice(base)


class _SpotNotice:
    """Only ``Preempt`` is an eviction (Freeze, Reboot, Redeploy, Terminate are
    maintenance); the document also lists other VMs' events in a scale set or
    availability set, so this VM's name must be among the event's Resources."""

    def __init__(self, base: str) -> None:
        self._base = base
        self._vm_name: str | None = None

    def __call__(self) -> str | None:
        name = self._name()
        url = f"{self._base}/metadata/scheduledevents?api-version={_EVENTS_API_VERSION}"
        for event in json.loads(fetch(url, _HEADERS))["Events"]:
            if event.get("EventType") != "Preempt":
                continue
            resources = event.get("Resources") or []
            if name is not None and resources and name not in resources:
                continue
            if event.get("NotBefore"):  # empty once the event has Started
                return f"Azure Scheduled Event Preempt (NotBefore {event['NotBefore']})"
            return f"Azure Scheduled Event Preempt ({event.get('EventStatus', 'Started')})"
        return None

    def _name(self) -> str | None:
        """This VM's name, asked until IMDS says; None (any Preempt counts) until then."""
        if self._vm_name is None:
            try:
                self._vm_name = str(_instance(self._base)["compute"]["name"])
            except Exception as exc:
                log.debug("the Azure VM's name: %s", exc)
        return self._vm_name
