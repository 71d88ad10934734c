"""Byte counts and rates as people read them in logs."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_rate(n: float, seconds: float) -> str:
    """Bytes over seconds as ``"12.3 MiB/s"``."""
    return f"{human_bytes(n / max(seconds, 1e-6))}/s"
