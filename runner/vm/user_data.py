"""Settings from the VM's user-data: a KEY=VALUE file (``RUNNER_*``, ``PREFECT_*``...) that
ranks below the environment, waited for until it names a flow run (the claim deadline)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from dotenv import dotenv_values

from runner.errors import BootstrapError, ConfigError
from runner.settings import Settings, load_settings

log = logging.getLogger("runner")

RUN_ID_KEYS = ("RUNNER_FLOW_RUN_ID", "PREFECT__FLOW_RUN_ID")
_POLL_SECONDS = 0.5


def settle(
    settings: Settings, *, stopped: Callable[[], str | None], poll: float = _POLL_SECONDS
) -> Settings:
    """``settings`` with the user-data file's values below them. While no flow run id is
    known, wait for the file to name one, up to ``--claim-timeout`` (cloud-init may write
    it after the runner started at boot); ``stopped()`` names a signal that ends the wait."""
    path = settings.user_data_file
    if path is None:
        return settings
    deadline = time.monotonic() + settings.claim_timeout
    waiting = False
    values = read(path)
    while not (settings.flow_run_id or any(values.get(key) for key in RUN_ID_KEYS)):
        if signal_name := stopped():
            raise BootstrapError(
                f"stopped by {signal_name} while waiting for a flow run id in {path}"
            )
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"no flow run id arrived in {path} within {settings.claim_timeout:g}s; the "
                "VM's user-data must set RUNNER_FLOW_RUN_ID (README: 'User data')"
            )
        if not waiting:
            log.info("waiting up to %gs for a flow run id in %s", settings.claim_timeout, path)
            waiting = True
        time.sleep(poll)
        values = read(path)
    for key, value in values.items():
        os.environ.setdefault(key, value)  # the environment wins over user-data
    # Flags and variables given so far still win: they are the fields already set.
    return load_settings(**settings.model_dump(exclude_unset=True))


def read(path: Path) -> dict[str, str]:
    """The file's variables; empty while it does not exist yet."""
    try:
        values = dotenv_values(path)
    except OSError:  # missing, or not readable yet
        return {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"user-data file {path} is not text: {exc}") from None
    return {key: value for key, value in values.items() if value is not None}
