"""What the guard reports while a run lasts: runner.metrics with plausible values, and
runner.phase.<name> events in order, the teardown phase last."""

from __future__ import annotations

import time

import httpx
import psutil

from runner.telemetry.reporter import PHASES
from tests.conftest import FLOWS_DIR
from tests.helpers import assert_gpus_match_nvml, read_events

METRIC_KEYS = {
    "cpu_percent", "load_1m", "memory_used_bytes", "memory_total_bytes", "swap_used_bytes",
    "disk_read_bytes", "disk_write_bytes", "net_sent_bytes", "net_recv_bytes",
    "worker_rss_bytes", "gpus",
}  # fmt: skip


def _events_with_prefix(api_url: str, prefix: str, run_id, *, at_least: int) -> list[dict]:
    body = {
        "filter": {
            "event": {"prefix": [prefix]},
            "any_resource": {"id": [f"prefect.flow-run.{run_id}"]},
            "order": "ASC",
        },
        "limit": 50,
    }
    deadline = time.monotonic() + 30
    while True:
        events = httpx.post(f"{api_url}/events/filter", json=body, timeout=10).json()["events"]
        if len(events) >= at_least or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def test_metrics_arrive_with_every_key_and_plausible_values(
    runner, flow_run, prefect_server, tmp_path
):
    run = flow_run("sleeper", pid_file=str(tmp_path / "pid"), seconds=4)

    result = runner.run("--flow-run-id", str(run.id), "--metrics-seconds", "1")

    assert result.returncode == 0, result.stderr
    events = read_events(
        prefect_server.api_url,
        event="runner.metrics",
        resource_id=f"prefect.flow-run.{run.id}",
        at_least=3,
    )
    assert len(events) >= 3
    for event in events:
        payload = event["payload"]
        assert set(payload) == METRIC_KEYS
        assert payload["memory_total_bytes"] == psutil.virtual_memory().total
        assert 0 < payload["memory_used_bytes"] <= payload["memory_total_bytes"]
        assert 0 <= payload["cpu_percent"] <= 100
        assert payload["worker_rss_bytes"] > 20 * 1024**2  # a Python with Prefect imported
        assert_gpus_match_nvml(payload["gpus"])
        assert min(payload[k] for k in METRIC_KEYS - {"gpus", "load_1m", "cpu_percent"}) >= 0


def test_phase_events_arrive_in_order_and_teardown_is_the_last_event(
    runner, flow_run, prefect_server, tmp_path
):
    pushed = runner.cli("bundle", "push", str(FLOWS_DIR), "--to", f"file://{tmp_path}/b")
    assert pushed.returncode == 0, pushed.stderr
    run = flow_run(
        "hello",
        path=None,
        pull_steps=[{"runner.steps.pull_bundle": {"url": pushed.stdout.strip()}}],
    )

    result = runner.run("--flow-run-id", str(run.id), "--heartbeat-seconds", "1")

    assert result.returncode == 0, result.stderr
    phases = _events_with_prefix(prefect_server.api_url, "runner.phase.", run.id, at_least=6)
    names = [e["event"].removeprefix("runner.phase.") for e in phases]
    assert names == list(PHASES)
    by_name = {e["event"].removeprefix("runner.phase."): e["payload"] for e in phases}
    assert by_name["code-pulled"]["cache_hit"] is False and by_name["code-pulled"]["seconds"] >= 0
    assert by_name["env-ready"]["environment"] == "runner"
    assert by_name["flow-finished"]["state"] == "COMPLETED"
    assert by_name["teardown"]["exit_code"] == 0
    elapsed = [p["elapsed_seconds"] for p in by_name.values()]
    assert elapsed == sorted(elapsed)

    ours = _events_with_prefix(prefect_server.api_url, "runner.", run.id, at_least=6)
    beats = _events_with_prefix(
        prefect_server.api_url, "prefect.flow-run.heartbeat", run.id, at_least=0
    )
    last = max([*ours, *beats], key=lambda e: e["occurred"])
    assert last["event"] == "runner.phase.teardown"


def test_the_run_summary_artifact_has_the_numbers(runner, flow_run, client, tmp_path):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    run = flow_run("sleeper", pid_file=str(tmp_path / "pid"), seconds=3)

    result = runner.run(
        "--flow-run-id", str(run.id), "--metrics-seconds", "1", "--hourly-cost", "3.6"
    )

    assert result.returncode == 0, result.stderr
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["runner-summary"]))
    )
    ours = [a for a in artifacts if a.flow_run_id == run.id]
    assert len(ours) == 1 and ours[0].type == "markdown"
    text = ours[0].data
    expected = [
        "| claimed |", "| flow-finished |", "| CPU (all cores) |", "| worker memory (RSS) |",
        "| bytes downloaded |", "| exit | 0 (completed), flow run COMPLETED |",
        "| cost estimate | $0.00",
    ]  # fmt: skip
    for line in expected:
        assert line in text, text
    flow_seconds = float(text.split("| flow-finished | ")[1].split(" ")[0])
    assert 3 <= flow_seconds < 10


def test_events_name_the_vm_from_its_metadata_service_and_its_type_prices_the_run(
    runner, flow_run, prefect_server, client, tmp_path
):
    from devtools.metadata_servers import AWS_RESOURCE, MetadataServer

    run = flow_run("sleeper", pid_file=str(tmp_path / "pid"), seconds=2)
    prices = tmp_path / "prices.json"
    prices.write_text('{"m6i.large": {"on_demand": 0.096, "spot": 0.04}, "m5.large": 0.1}')

    with MetadataServer() as imds:
        result = runner.run(
            "--flow-run-id", str(run.id), "--heartbeat-seconds", "1",
            "--cloud", "aws", "--metadata-url", imds.url, "--price-table", str(prices),
        )  # fmt: skip

    assert result.returncode == 0, result.stderr
    for name in ("prefect.flow-run.heartbeat", "runner.phase.teardown"):
        event = read_events(
            prefect_server.api_url, event=name, resource_id=f"prefect.flow-run.{run.id}"
        )[0]
        vm = [r for r in event["related"] if r["prefect.resource.role"] == "vm"]
        assert vm == [AWS_RESOURCE]
    (artifact,) = [a for a in client.read_artifacts() if a.flow_run_id == run.id]
    assert "(at $0.04/h, m6i.large spot, price table) |" in artifact.data  # a spot machine
