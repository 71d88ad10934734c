"""The metrics sampler: every payload key, counters from the sampler's start, the worker's
process tree."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from runner.telemetry.metrics import Sampler
from tests.helpers import assert_gpus_match_nvml


def test_a_sample_has_every_key_and_counts_from_the_start(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"]
    )
    try:
        sampler = Sampler(os.getpid())
        (tmp_path / "blob").write_bytes(os.urandom(1 << 20))
        os.sync()
        deadline = time.monotonic() + 20
        while psutil.Process(child.pid).memory_info().rss < 64 << 20:
            assert time.monotonic() < deadline, "the child never grew"
            time.sleep(0.05)
        sample = sampler.sample()
    finally:
        child.kill()
        child.wait()

    assert set(sample) == {
        "cpu_percent", "load_1m", "memory_used_bytes", "memory_total_bytes", "swap_used_bytes",
        "disk_read_bytes", "disk_write_bytes", "net_sent_bytes", "net_recv_bytes",
        "worker_rss_bytes", "gpus",
    }  # fmt: skip
    own = psutil.Process().memory_info().rss
    assert sample["worker_rss_bytes"] >= own + (64 << 20)  # this process and its child
    assert sample["disk_write_bytes"] >= 0 and sample["net_sent_bytes"] >= 0
    assert sample["disk_write_bytes"] < psutil.disk_io_counters().write_bytes  # not since boot
    assert_gpus_match_nvml(sample["gpus"])


def test_a_dead_worker_has_no_memory():
    assert Sampler(2**22 + 12345).sample()["worker_rss_bytes"] == 0
