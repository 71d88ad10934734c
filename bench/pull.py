"""Bundle benchmark on a local S3 server (moto): pull and push of a ~200 MB bundle.

- pull: the runner's fetch (concurrent ranged download + sha256 verify, cold
  cache) vs boto3 ``download_file`` with a tuned TransferConfig; alternating,
  medians; goal: runner throughput >= 0.9x plain.
- warm: the runner's fetch when the bundle is already in the cache; goal < 50 ms.
- extract: safe extraction of the bundle into a new directory (reported only).
- push: ``python -m runner bundle push`` vs ``tar czf`` + boto3 ``upload_file``;
  goal: runner <= 1.5x.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devtools.storage_servers import MotoServer

MiB = 1024 * 1024
GOALS = {"pull_throughput_ratio_min": 0.9, "warm_hit_ms_max": 50.0, "push_ratio_max": 1.5}


def make_tree(root: Path, *, small_files: int, small_size: int, large_size: int) -> None:
    """Many small files plus one large one, incompressible like real wheels or data."""
    for i in range(small_files):
        sub = root / "pkg" / f"mod{i // 100:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"file{i:05d}.bin").write_bytes(os.urandom(small_size))
    (root / "flow.py").write_text("from prefect import flow\n\n@flow\ndef big():\n    return 1\n")
    with open(root / "model.bin", "wb") as fh:
        for _ in range(large_size // MiB):
            fh.write(os.urandom(MiB))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=200, help="approximate bundle size")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="runner-bench-pull-"))
    tree = scratch / "tree"
    make_tree(
        tree, small_files=1000, small_size=args.mib * MiB // 2000, large_size=args.mib * MiB // 2
    )
    try:
        with MotoServer() as s3:
            s3.create_bucket("bench")
            os.environ.update(s3.env())
            return run(args, scratch, tree)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, scratch: Path, tree: Path) -> int:
    import boto3
    from boto3.s3.transfer import TransferConfig

    from runner.code import fetch
    from runner.settings import Settings

    s3 = boto3.client("s3")
    tuned = TransferConfig(
        multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB, max_concurrency=8
    )
    push_cmd = [sys.executable, "-m", "runner", "bundle", "push", str(tree), "--to", "s3://bench/b"]
    times: dict[str, list[float]] = {"push": [], "tar_upload": [], "pull": [], "plain": []}
    url = ""
    for i in range(args.runs):
        for name in ("push", "tar_upload") if i % 2 == 0 else ("tar_upload", "push"):
            for obj in s3.list_objects_v2(Bucket="bench").get("Contents", []):
                s3.delete_object(Bucket="bench", Key=obj["Key"])  # both must really upload
            started = time.perf_counter()
            if name == "push":
                url = subprocess.run(
                    push_cmd, check=True, capture_output=True, text=True
                ).stdout.strip()
            else:
                archive = scratch / "tar.tgz"
                subprocess.run(["tar", "czf", str(archive), "-C", str(tree), "."], check=True)
                s3.upload_file(str(archive), "bench", "plain.tgz", Config=tuned)
            times[name].append(time.perf_counter() - started)
    if s3.list_objects_v2(Bucket="bench", Prefix="b/").get("KeyCount", 0) == 0:
        subprocess.run(push_cmd, check=True, capture_output=True)
    key = url.removeprefix("s3://bench/")
    size = s3.head_object(Bucket="bench", Key=key)["ContentLength"]

    workdir = scratch / "work"
    settings = Settings(workdir=workdir)
    for i in range(args.runs):
        for name in ("pull", "plain") if i % 2 == 0 else ("plain", "pull"):
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir()
            started = time.perf_counter()
            if name == "pull":
                fetch(url, settings=settings, say=lambda _: None)
            else:
                s3.download_file("bench", key, str(workdir / "plain.tgz"), Config=tuned)
            times[name].append(time.perf_counter() - started)

    warm = []
    for _ in range(5):
        started = time.perf_counter()
        fetch(url, settings=settings, say=lambda _: None)
        warm.append((time.perf_counter() - started) * 1000)

    # Extraction is the rest of a cold pull; reported, no goal.
    from runner.bundle import Limits, extract

    archive = fetch(url, settings=settings, say=lambda _: None).archive
    started = time.perf_counter()
    extract(archive, workdir / "extracted", limits=Limits(max_bytes=2**40, max_files=10**6))
    extract_s = time.perf_counter() - started

    med = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "bench": "pull",
        "runs_each": args.runs,
        "bundle_mib": round(size / MiB, 1),
        "medians_s": {k: round(v, 3) for k, v in med.items()},
        "pull_mib_s": round(size / MiB / med["pull"], 1),
        "plain_mib_s": round(size / MiB / med["plain"], 1),
        "pull_throughput_ratio": round(med["plain"] / med["pull"], 3),
        "warm_hit_ms": round(statistics.median(warm), 2),
        "extract_s": round(extract_s, 3),
        "push_ratio": round(med["push"] / med["tar_upload"], 3),
        "goals": GOALS,
    }
    result["met"] = (
        result["pull_throughput_ratio"] >= GOALS["pull_throughput_ratio_min"]
        and result["warm_hit_ms"] < GOALS["warm_hit_ms_max"]
        and result["push_ratio"] <= GOALS["push_ratio_max"]
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
