"""The ``runner-summary`` artifact: what the machine did for one run, as a markdown table
(pure: numbers in, markdown out)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runner.errors import ExitCode
from runner.units import human_bytes
from runner.vm.prices import Price

ARTIFACT_KEY = "runner-summary"


@dataclass
class Usage:
    """Peaks and means of the metrics samples taken during the run."""

    samples: int = 0
    _sums: dict[str, float] = field(default_factory=dict)
    _peaks: dict[str, float] = field(default_factory=dict)

    def add(self, sample: dict[str, Any]) -> None:
        self.samples += 1
        values = {
            "cpu_percent": sample["cpu_percent"],
            "memory_used_bytes": sample["memory_used_bytes"],
            "worker_rss_bytes": sample["worker_rss_bytes"],
        }
        for gpu in sample.get("gpus") or []:
            values[f"gpu{gpu['index']}_percent"] = gpu["utilization_percent"]
            values[f"gpu{gpu['index']}_memory_bytes"] = gpu["memory_used_bytes"]
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
            self._peaks[key] = max(self._peaks.get(key, value), value)

    def peak(self, key: str) -> float | None:
        return self._peaks.get(key)

    def mean(self, key: str) -> float | None:
        return self._sums[key] / self.samples if key in self._sums else None

    def measured(self) -> list[str]:
        """What was measured, in first-seen order."""
        return list(self._sums)


def render(
    *,
    phases: dict[str, float],
    usage: Usage,
    bytes_downloaded: int,
    cache_hits: dict[str, bool],
    exit_code: int,
    state: str | None,
    wall_seconds: float,
    price: Price | None,
) -> str:
    """The summary as markdown: phases, resources, data, outcome, cost."""
    lines = ["# Run summary", "", "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in phases.items()]
    lines += [f"| **total (runner start to teardown)** | {wall_seconds:.2f} |", ""]
    lines += ["| resource | peak | mean |", "| --- | --- | --- |"]
    if usage.samples == 0:
        lines.append("| (no metrics samples: the run was shorter than --metrics-seconds) | | |")
    for key in usage.measured():
        peak, mean = usage.peak(key), usage.mean(key)
        assert peak is not None and mean is not None
        if key.endswith("_bytes"):
            lines.append(f"| {_label(key)} | {human_bytes(int(peak))} | {human_bytes(int(mean))} |")
        else:
            lines.append(f"| {_label(key)} | {peak:.0f}% | {mean:.0f}% |")
    lines += ["", "| | |", "| --- | --- |"]
    lines.append(f"| bytes downloaded | {human_bytes(bytes_downloaded)} |")
    for what, hit in cache_hits.items():
        lines.append(f"| {what} cache | {'hit' if hit else 'miss'} |")
    meaning = (
        ExitCode(exit_code).name.lower().replace("_", " ") if exit_code in set(ExitCode) else "?"
    )
    lines.append(f"| exit | {exit_code} ({meaning}){f', flow run {state}' if state else ''} |")
    if price is not None:
        cost = price.hourly * wall_seconds / 3600
        lines.append(f"| cost estimate | ${cost:.4f} (at ${price.hourly:g}/h, {price.basis}) |")
    return "\n".join(lines) + "\n"


def _label(key: str) -> str:
    return {
        "cpu_percent": "CPU (all cores)",
        "memory_used_bytes": "memory used (machine)",
        "worker_rss_bytes": "worker memory (RSS)",
    }.get(key, key.replace("_percent", " utilization").replace("_memory_bytes", " memory"))
