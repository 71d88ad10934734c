"""Explain how a worker process ended: signal or exit code, peak memory, likely OOM."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from runner.units import human_bytes

# A SIGKILL with the peak RSS this close to the limit is almost always the OOM killer.
_OOM_FRACTION = 0.9


@dataclass(frozen=True)
class Stop:
    """Why the guard stopped the worker: ``reason`` is cancel, preemption, max-runtime or
    interrupt; ``detail`` says by what, for people ("SIGTERM", "the cancel request",
    "AWS spot interruption notice: terminate at ...")."""

    reason: str
    detail: str


@dataclass(frozen=True)
class WorkerExit:
    """What the guard observed when the worker ended."""

    status: int  # raw wait status
    peak_rss_bytes: int
    stop: Stop | None = None  # set when the guard asked the worker to stop
    killed_by_guard: bool = False  # the grace period ran out and the guard sent SIGKILL
    oom_kills: int = 0  # OOM kills recorded in this cgroup while the worker ran
    memory_limit_bytes: int = field(default_factory=lambda: memory_limit())

    @property
    def signal_name(self) -> str | None:
        if os.WIFSIGNALED(self.status):
            return signal.Signals(os.WTERMSIG(self.status)).name
        return None

    @property
    def exit_code(self) -> int | None:
        return os.WEXITSTATUS(self.status) if os.WIFEXITED(self.status) else None

    def likely_oom(self) -> bool:
        return (
            self.signal_name == "SIGKILL"
            and not self.killed_by_guard
            and (
                self.oom_kills > 0 or self.peak_rss_bytes >= _OOM_FRACTION * self.memory_limit_bytes
            )
        )

    def describe(self) -> str:
        """One line for the Crashed state message and the journal."""
        asked = self.stop.detail if self.stop else ""
        if self.killed_by_guard:
            how = f"worker did not stop after {asked} and was killed (SIGKILL)"
        elif self.signal_name:
            how = f"worker process was killed by {self.signal_name}"
            if asked:
                how += f" (stopped by the guard after {asked})"
        else:
            how = f"worker process exited with code {self.exit_code} before reporting a final state"
        peak, limit = human_bytes(self.peak_rss_bytes), human_bytes(self.memory_limit_bytes)
        memory = f"peak RSS {peak} of {limit} memory limit"
        oom = "; likely out of memory" if self.likely_oom() else ""
        return f"{how}; {memory}{oom}"


def memory_limit() -> int:
    """The memory the worker can use: the cgroup v2 limit if one is set, else total RAM."""
    total = psutil.virtual_memory().total
    raw = _cgroup_file("memory.max")
    if raw and raw.strip().isdigit():
        return min(int(raw), total)
    return total


def oom_kill_count() -> int:
    """OOM kills so far in this process's cgroup (cgroup v2 ``memory.events``), 0 if unknown."""
    raw = _cgroup_file("memory.events") or ""
    for line in raw.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def _cgroup_file(name: str) -> str | None:
    try:
        entry = Path("/proc/self/cgroup").read_text().strip().splitlines()[0]
        relative = entry.split(":", 2)[2].lstrip("/")
        return (Path("/sys/fs/cgroup") / relative / name).read_text()
    except (OSError, IndexError):
        return None
