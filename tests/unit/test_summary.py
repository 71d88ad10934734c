"""The run summary's markdown: phases, peaks and means, data, outcome, cost."""

from __future__ import annotations

from runner.telemetry.summary import Usage, render
from runner.vm.prices import Price


def _sample(cpu: float, rss: int, gpu: int | None = None) -> dict:
    one = {"index": 0, "utilization_percent": gpu, "memory_used_bytes": 2**30}
    gpus = [] if gpu is None else [{**one, "memory_total_bytes": 2**34}]
    return {"cpu_percent": cpu, "memory_used_bytes": 2**31, "worker_rss_bytes": rss, "gpus": gpus}


def test_peaks_means_and_cost():
    usage = Usage()
    usage.add(_sample(20, 100 * 2**20, gpu=50))
    usage.add(_sample(80, 300 * 2**20, gpu=100))

    text = render(
        phases={"claimed": 0.1, "code-pulled": 0.5, "flow-finished": 60.0},
        usage=usage,
        bytes_downloaded=3 * 2**20,
        cache_hits={"bundle": False, "environment": True},
        exit_code=1,
        state="FAILED",
        wall_seconds=3600,
        price=Price(2.5, "--hourly-cost"),
    )

    assert "| CPU (all cores) | 80% | 50% |" in text
    assert "| worker memory (RSS) | 300.0 MiB | 200.0 MiB |" in text
    assert "| gpu0 utilization | 100% | 75% |" in text
    assert "| bytes downloaded | 3.0 MiB |" in text
    assert "| bundle cache | miss |" in text and "| environment cache | hit |" in text
    assert "| exit | 1 (flow failed), flow run FAILED |" in text
    assert "| cost estimate | $2.5000 (at $2.5/h, --hourly-cost) |" in text


def test_no_samples_and_no_price():
    text = render(
        phases={"claimed": 0.1},
        usage=Usage(),
        bytes_downloaded=0,
        cache_hits={},
        exit_code=5,
        state=None,
        wall_seconds=1,
        price=None,
    )

    assert "no metrics samples" in text and "cost estimate" not in text
    assert "| exit | 5 (crashed) |" in text
