"""The launch benchmark's flow: its first line is what the figures end at."""

from prefect import flow


@flow(log_prints=True)
def launched() -> None:
    print("first line of the flow")
