"""The benchmark's trivial flow: its first line records when the flow body started."""

import time

from prefect import flow


@flow
def first_line(stamp: str) -> None:
    with open(stamp, "w") as fh:
        fh.write(repr(time.time()))
