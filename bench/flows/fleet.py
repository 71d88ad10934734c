"""The fleet benchmark's flow: a VM's job that logs one numbered line a second, so that a
lost log line shows as a missing number."""

import time

from prefect import flow, get_run_logger


@flow
def vm_job(seconds: int = 20) -> int:
    logger = get_run_logger()
    for tick in range(seconds):
        logger.info("tick %d", tick)
        time.sleep(1)
    return seconds
