"""Which machine this is (cloud, region, instance id and type, spot), for the VM resource on
every event: DMI first (a file read, no network), then that cloud's instance metadata
service (each cloud's module in ``runner.vm.clouds``) with short timeouts."""

from __future__ import annotations

import logging
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from runner.vm import clouds

log = logging.getLogger("runner")

DMI = Path("/sys/class/dmi/id")
_TIMEOUT = 1.0  # seconds per request: the metadata service is local or absent


@dataclass(frozen=True)
class Machine:
    cloud: str  # aws | gcp | azure | unknown
    instance_id: str
    region: str = "unknown"
    instance_type: str = "unknown"
    spot: bool | None = None  # None: not known

    def resource(self) -> dict[str, str]:
        """The machine as a related event resource."""
        return {
            "prefect.resource.id": f"runner.vm.{self.instance_id}",
            "prefect.resource.role": "vm",
            "cloud": self.cloud,
            "region": self.region,
            "instance-type": self.instance_type,
            "spot": "unknown" if self.spot is None else str(self.spot).lower(),
        }


class Dmi:
    """The firmware's strings, ``dmi["sys_vendor"]``; "" for a file that can't be read."""

    def __init__(self, root: Path = DMI) -> None:
        self._root = root

    def __getitem__(self, name: str) -> str:
        try:
            return (self._root / name).read_text().strip()
        except OSError:
            return ""

    @property
    def vendor(self) -> str:
        """Who made the machine, in the words each cloud's firmware uses somewhere."""
        return f"{self['sys_vendor']} {self['bios_vendor']} {self['product_name']}"


def detect(*, cloud: str, urls: dict[str, str], dmi: Path = DMI) -> Machine:
    """This machine; ``cloud`` "auto" asks DMI which cloud (if any) to query. Never
    raises: an unreachable or odd metadata service gives an ``unknown`` machine."""
    if cloud == "auto":
        cloud = cloud_from_dmi(dmi)
    if cloud in clouds.CLOUDS:
        try:
            return clouds.load(cloud).machine(urls[cloud])
        except Exception as exc:  # metadata is a nicety: the run goes on without it
            log.info("instance metadata (%s) not available: %s", cloud, exc)
    return Machine(cloud="unknown", instance_id=socket.gethostname())


def cloud_from_dmi(dmi: Path = DMI) -> str:
    """The first of ``clouds.CLOUDS`` whose firmware strings these are; "none" off-cloud
    (or unreadable)."""
    strings = Dmi(dmi)
    for name in clouds.CLOUDS:
        if clouds.load(name).in_dmi(strings):
            return name
    return "none"


def fetch(url: str, headers: dict[str, str], method: str = "GET") -> str:
    """The body of one request to a metadata service; raises ``urllib.error.HTTPError``
    (with its ``code``) for a non-2xx answer and ``OSError`` when there is no answer."""
    request = urllib.request.Request(url, headers=headers, method=method)
    # No proxy: the metadata service is link-local, and a proxy would answer for it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=_TIMEOUT) as response:
        return response.read().decode()


class Detection:
    """``detect`` in a background thread (started after the fork: the worker never
    inherits a thread), so that metadata requests never hold up the run."""

    def __init__(self, *, cloud: str, urls: dict[str, str]) -> None:
        self._machine: Machine | None = None
        self._thread = threading.Thread(
            target=self._run, args=(cloud, urls), name="runner-metadata", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def result(self, timeout: float = 3.0) -> Machine | None:
        """The machine, waiting up to ``timeout`` s for it; None if still unknown."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return self._machine

    def _run(self, cloud: str, urls: dict[str, str]) -> None:
        self._machine = detect(cloud=cloud, urls=urls)
