"""The runner's own log lines: one format, to stderr (the journal on a VM), secrets masked."""

from __future__ import annotations

import logging
import sys

from runner.redaction import MaskFilter


def configure(level: str) -> None:
    """One line per record, naming the process, so guard and worker lines can be told apart."""
    logger = logging.getLogger("runner")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s runner[%(process)d] %(levelname)s %(message)s")
    )
    handler.addFilter(MaskFilter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
