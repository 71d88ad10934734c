"""The runner's own log lines: one format, to stderr (the journal on a VM) and, during a
run, to the run's log file (uploaded to --log-url); secrets masked."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from runner.redaction import MaskFilter

_FORMAT = logging.Formatter("%(asctime)s runner[%(process)d] %(levelname)s %(message)s")


def configure(level: str) -> None:
    """One line per record, naming the process, so guard and worker lines can be told apart."""
    logger = logging.getLogger("runner")
    if logger.handlers:
        return
    _add(logger, logging.StreamHandler(sys.stderr))
    logger.setLevel(level)
    logger.propagate = False


def capture(path: Path) -> None:
    """Also write the runner's lines to ``path``. Appended to: a forked worker inherits the
    handler, and a flow stage after an exec opens the same file again. A file that cannot
    be written costs the run its log file only (the lines still go to stderr)."""
    logger = logging.getLogger("runner")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        logger.warning("cannot write the runner's log file %s: %s", path, exc)
        return
    _add(logger, handler)


def captured() -> Path | None:
    """The file the runner's lines are written to, if any."""
    for handler in logging.getLogger("runner").handlers:
        if isinstance(handler, logging.FileHandler):
            return Path(handler.baseFilename)
    return None


def release() -> None:
    """Stop writing to the log file (before it is uploaded and removed)."""
    logger = logging.getLogger("runner")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
            handler.close()


def _add(logger: logging.Logger, handler: logging.Handler) -> None:
    handler.setFormatter(_FORMAT)
    handler.addFilter(MaskFilter())
    logger.addHandler(handler)
