"""The overhead benchmark's CPU-bound flow: a pure-Python loop that holds the GIL."""

import time

from prefect import flow


@flow
def spin(seconds: float) -> int:
    deadline = time.monotonic() + seconds
    turns = 0
    while time.monotonic() < deadline:
        turns += 1
    return turns
