"""Notice that the cloud is about to take this spot/preemptible VM back, polled from the
instance metadata service (AWS IMDSv2, GCE, Azure Scheduled Events); ``on_notice`` is
called once, from a thread, so the guard's own loop never waits on the network."""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
from collections.abc import Callable

from runner.vm.metadata import aws_token, fetch

log = logging.getLogger("runner")

_AWS_TOKEN_TTL_SECONDS = 21600  # the most IMDSv2 allows; a 401 fetches a new one anyway
_AZURE_API_VERSION = "2020-07-01"


class SpotWatch:
    """``SpotWatch("aws", settings.metadata_urls(), poll_seconds=5, on_notice=...)``;
    ``start()``, ``stop()``. ``on_notice(description)`` gets one short line, at most once."""

    def __init__(
        self,
        cloud: str,
        urls: dict[str, str],
        *,
        poll_seconds: float,
        on_notice: Callable[[str], None],
    ) -> None:
        self._cloud = cloud
        self._urls = urls
        self._poll_seconds = poll_seconds
        self._on_notice = on_notice
        self._stopping = threading.Event()
        self._fired = False
        self._lock = threading.Lock()
        self._aws_token: str | None = None
        self._azure_vm_name: str | None = None
        self._thread = threading.Thread(target=self._poll, name="runner-spot-poll", daemon=True)

    def start(self) -> None:
        if self._cloud in ("aws", "gcp", "azure") and self._poll_seconds > 0:
            self._thread.start()

    def stop(self) -> None:
        """Returns at once; a request in flight ends within its short timeout, unheard."""
        self._stopping.set()

    def _fire(self, description: str) -> None:
        with self._lock:
            if self._fired or self._stopping.is_set():
                return
            self._fired = True
        log.info("preemption notice: %s", description)
        self._on_notice(description)

    def _poll(self) -> None:
        check = {"aws": self._aws, "gcp": self._gcp, "azure": self._azure}[self._cloud]
        base = self._urls[self._cloud]
        while not self._stopping.is_set():
            try:
                description = check(base)
            except Exception as exc:  # down, 5xx or an odd body: ask again next tick
                log.debug("polling %s for a preemption notice: %s", self._cloud, exc)
                description = None
            if description is not None:
                self._fire(description)
                return
            self._stopping.wait(self._poll_seconds)

    def _aws(self, base: str) -> str | None:
        """``spot/instance-action`` is 404 until AWS schedules the interruption."""
        for attempt in range(2):
            if self._aws_token is None:
                self._aws_token = aws_token(base, _AWS_TOKEN_TTL_SECONDS)
            headers = {"X-aws-ec2-metadata-token": self._aws_token}
            try:
                body = fetch(f"{base}/latest/meta-data/spot/instance-action", headers)
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                if exc.code == 401 and attempt == 0:  # the token expired: one new try
                    self._aws_token = None
                    continue
                raise
            notice = json.loads(body)
            return f"AWS spot interruption notice: {notice['action']} at {notice['time']}"
        return None

    def _gcp(self, base: str) -> str | None:
        headers = {"Metadata-Flavor": "Google"}
        body = fetch(f"{base}/computeMetadata/v1/instance/preempted", headers).strip().upper()
        if body == "TRUE":
            return "GCE preempted the instance"
        if body != "FALSE":
            raise ValueError(f"instance/preempted answered {body[:40]!r}")
        return None

    def _azure(self, base: str) -> str | None:
        """Only ``Preempt`` is an eviction (Freeze, Reboot, Redeploy, Terminate are
        maintenance); the document also lists other VMs' events in a scale set or
        availability set, so this VM's name must be among the event's Resources."""
        headers = {"Metadata": "true"}
        name = self._azure_name(base)
        document = json.loads(
            fetch(f"{base}/metadata/scheduledevents?api-version={_AZURE_API_VERSION}", headers)
        )
        for event in document["Events"]:
            if event.get("EventType") != "Preempt":
                continue
            resources = event.get("Resources") or []
            if name is not None and resources and name not in resources:
                continue
            if event.get("NotBefore"):  # empty once the event has Started
                return f"Azure Scheduled Event Preempt (NotBefore {event['NotBefore']})"
            return f"Azure Scheduled Event Preempt ({event.get('EventStatus', 'Started')})"
        return None

    def _azure_name(self, base: str) -> str | None:
        """This VM's name, asked once; None (any Preempt counts) if IMDS won't say."""
        if self._azure_vm_name is None:
            try:
                document = json.loads(
                    fetch(f"{base}/metadata/instance?api-version=2021-02-01", {"Metadata": "true"})
                )
                self._azure_vm_name = str(document["compute"]["name"])
            except Exception as exc:
                log.debug("the Azure VM's name: %s", exc)
        return self._azure_vm_name
