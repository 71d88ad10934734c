"""Before the teardown: upload the runner's log to ``--log-url``, then remove what the run
left in the workdir (its directory and its log file) unless ``--keep-workdir``."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from contextlib import suppress
from pathlib import Path

from runner import logs
from runner.settings import Settings

log = logging.getLogger("runner")


def clean_up(settings: Settings, *, claimed: bool) -> None:
    """Best effort, never raises: the teardown comes next whatever happens here. The run's
    directory is removed only by the runner that claimed the run; another runner given
    the same run must not pull it from under the one executing it."""
    path = logs.captured()
    if path is not None and settings.log_url:
        _upload(path, settings)
    logs.release()
    if settings.keep_workdir:
        return
    if path is not None:
        with suppress(OSError):
            path.unlink(missing_ok=True)
    if claimed:
        shutil.rmtree(settings.run_dir(), ignore_errors=True)


def _upload(path: Path, settings: Settings) -> None:
    from runner.storage import join, redact, resolve

    assert settings.log_url is not None
    try:
        url = join(join(settings.log_url, str(settings.run_id())), log_name())
        log.info("uploading the runner's log to %s", redact(url))
        storage, key = resolve(url)
        storage.upload(path, key)
    except Exception as exc:  # the log is in the journal too; the run's outcome stands
        log.error("could not upload the runner's log to --log-url: %s", exc)


def log_name() -> str:
    """``<host>-<guard pid>.log``: two runners given the same run never overwrite each other."""
    return f"{socket.gethostname()}-{os.getpid()}.log"
