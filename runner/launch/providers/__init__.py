"""Pick the VM provider named by the ``provider`` job variable; each is imported on first use."""

from __future__ import annotations

import importlib
from typing import Any

from runner.errors import ConfigError
from runner.launch.providers.base import CapacityError, Provider, Vm, VmRequest

__all__ = ["PROVIDERS", "CapacityError", "Provider", "Vm", "VmRequest", "provider_for"]

# name -> "module:factory"; the factory takes the job configuration's fields as keywords.
# Dotted paths, so that the local provider never imports a cloud SDK.
PROVIDERS: dict[str, str] = {
    "local": "runner.launch.providers.local:from_config",
    "aws": "runner.launch.providers.aws:from_config",
    "gcp": "runner.launch.providers.gcp:from_config",
    "azure": "runner.launch.providers.azure:from_config",
}


def provider_for(name: str, **config: Any) -> Provider:
    """The provider called ``name``, made from the job configuration's fields."""
    target = PROVIDERS.get(name)
    if target is None:
        raise ConfigError(
            f"unknown VM provider {name!r}; the provider job variable takes one of: "
            f"{', '.join(sorted(PROVIDERS))}"
        )
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)(**config)
