"""Pick the module that knows a cloud (its DMI strings, metadata, spot notice) by its name."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    from runner.vm.metadata import Dmi, Machine

__all__ = ["CLOUDS", "Cloud", "NoticeCheck", "load"]

# name -> module. Dotted paths, imported on first use, like runner/storage's backends;
# the order is the order in which DMI is asked which cloud this is. A new cloud is one
# module (see Cloud) and one line here: --cloud accepts every name in this table.
CLOUDS: dict[str, str] = {
    "aws": "runner.vm.aws",
    "gcp": "runner.vm.gcp",
    "azure": "runner.vm.azure",
}

NoticeCheck = Callable[[], str | None]


class Cloud(Protocol):
    """What each module in ``CLOUDS`` holds, at module level.

    ``METADATA_URL``: the base URL of the cloud's instance metadata service, without a
    trailing slash (``--metadata-url`` replaces it, for tests or a proxy).
    ``in_dmi(dmi)``: whether the firmware's strings name this cloud; no network.
    ``machine(base)``: this machine, from the instance metadata service at ``base``;
    raises (``OSError``, ``urllib.error.HTTPError``, a ``KeyError`` or ``ValueError`` for
    an odd body) when it can't say, and the caller falls back to an unknown machine.
    ``spot_notice(base)``: a check to call once per poll, made once per watch so that it
    may keep state between polls (a token, this VM's name); it returns None until the
    cloud takes the VM back, then one short line, and raises when the service can't say
    (the watch asks again next tick).
    """

    METADATA_URL: str

    def in_dmi(self, dmi: Dmi) -> bool: ...

    def machine(self, base: str) -> Machine: ...

    def spot_notice(self, base: str) -> NoticeCheck: ...


def load(name: str) -> Cloud:
    """The module of the cloud called ``name``, one of ``CLOUDS``."""
    return cast(Cloud, importlib.import_module(CLOUDS[name]))
