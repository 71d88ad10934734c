"""One hardware snapshot for ``runner.metrics``: pure sampling (psutil; NVIDIA GPUs through
nvidia-ml-py when a driver is present), no sending."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import psutil


class Sampler:
    """Snapshots of this machine and of the worker's process tree. CPU percent is over
    the time since the previous sample; disk and network bytes count from the
    sampler's creation (the runner's start), not from boot."""

    def __init__(self, worker_pid: int) -> None:
        self._worker_pid = worker_pid
        self._disk0 = _disk()
        self._net0 = _net()
        psutil.cpu_percent(interval=None)  # the first call only starts the interval
        self._nvml = _nvml()

    def sample(self) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        disk, net = _disk(), _net()
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "load_1m": os.getloadavg()[0],
            "memory_used_bytes": vm.total - vm.available,
            "memory_total_bytes": vm.total,
            "swap_used_bytes": psutil.swap_memory().used,
            "disk_read_bytes": disk[0] - self._disk0[0],
            "disk_write_bytes": disk[1] - self._disk0[1],
            "net_sent_bytes": net[0] - self._net0[0],
            "net_recv_bytes": net[1] - self._net0[1],
            "worker_rss_bytes": _tree_rss(self._worker_pid),
            "gpus": _gpus(self._nvml),
        }


def _disk() -> tuple[int, int]:
    counters = psutil.disk_io_counters()
    return (counters.read_bytes, counters.write_bytes) if counters else (0, 0)


def _net() -> tuple[int, int]:
    counters = psutil.net_io_counters()
    return (counters.bytes_sent, counters.bytes_recv) if counters else (0, 0)


def _tree_rss(pid: int) -> int:
    """The worker and its children (a flow's subprocesses, a container's CLI) together."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


def _nvml() -> Any | None:
    """pynvml, initialised, when an NVIDIA driver is present; None otherwise."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no package, no driver, no device: no GPU section
        return None
    return pynvml


def _gpus(nvml: Any | None) -> list[dict[str, Any]]:
    if nvml is None:
        return []
    gpus = []
    with contextlib.suppress(Exception):
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                {
                    "index": index,
                    "utilization_percent": nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                    "memory_used_bytes": memory.used,
                    "memory_total_bytes": memory.total,
                }
            )
    return gpus
