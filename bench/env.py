"""Environment benchmark: `python -m runner env build` (cold, warm) vs `venv` + `pip install`.

Serves the ~20 ``rvm-*`` test wheels of ``devtools.wheel_index`` on loopback and
installs all of them (a small dependency graph) from a requirements file:

- pip: ``python -m venv`` then ``pip install -r`` with ``--no-cache-dir``, the
  baseline a flow image or a hand-made VM would use;
- runner cold: ``runner env build`` in a fresh workdir with a fresh, empty
  ``UV_CACHE_DIR``, so nothing is reused from an earlier run;
- runner warm: the same command again in the same workdir: a cache hit. Both
  the command's wall time and the lookup time it reports are recorded.

Alternating, medians over runs; prints one JSON line with ``cold_ratio`` =
runner cold / pip (goal <= 0.25) and ``warm_lookup_ms`` (goal < 100).
``--baseline-only`` measures pip alone (no runner command needed).
Every env is checked by importing the top package, outside the timings.
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
from dataclasses import dataclass
from pathlib import Path

from devtools.storage_servers import HttpFileServer
from devtools.wheel_index import build_index, project_names, write_requirements

GOALS = {"cold_ratio_max": 0.25, "warm_lookup_ms_max": 100.0, "exec_overhead_max": 0.10}
TRIVIAL_FLOW = Path(__file__).resolve().parent / "flows" / "trivial.py"
TOP_MODULE = "rvm_app"  # imports (transitively) every package but one: proves the env works


@dataclass(frozen=True)
class Bench:
    """What every measurement shares: the served index and the requirements to install."""

    scratch: Path
    index_url: str
    requirements: Path
    env: dict[str, str]

    def fresh_dir(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.scratch))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs of each command (default 3)")
    parser.add_argument(
        "--baseline-only", action="store_true", help="measure venv + pip only, not the runner"
    )
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="runner-bench-env-"))
    try:
        root = build_index(scratch / "index")
        requirements = write_requirements(scratch / "requirements.txt", project_names())
        with HttpFileServer(root) as http:
            bench = Bench(scratch, f"{http.url}/simple", requirements, _isolated_env())
            result = run(bench, runs=args.runs, baseline_only=args.baseline_only)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result))
    return 0


def _isolated_env() -> dict[str, str]:
    """This environment without pip/uv configuration, so both installers see only the
    bench's index (a machine's pip.conf may add find-links or extra indexes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    env.pop("VIRTUAL_ENV", None)
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", UV_NO_CONFIG="1")
    return env


def run(bench: Bench, *, runs: int, baseline_only: bool) -> dict:
    """Alternate pip and runner-cold (each cold run followed by its warm run); medians."""
    samples: dict[str, list[float]] = {}
    names = ("pip",) if baseline_only else ("pip", "runner")
    for i in range(runs):
        # Alternate which goes first so that drift on the machine hits both alike.
        for name in names if i % 2 == 0 else names[::-1]:
            measured = measure_pip(bench) if name == "pip" else measure_runner(bench)
            for key, seconds in measured.items():
                samples.setdefault(key, []).append(seconds)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    result: dict = {
        "bench": "env",
        "runs_each": runs,
        "packages": len(project_names()),
        "medians_s": {key: round(value, 3) for key, value in medians.items()},
    }
    if baseline_only:
        return {**result, "baseline_only": True}
    result["cold_ratio"] = round(medians["runner_cold"] / medians["pip"], 3)
    result["warm_lookup_ms"] = round(medians["runner_warm_lookup"] * 1000, 2)
    result["warm_wall_ms"] = round(medians["runner_warm_wall"] * 1000, 1)
    result.update(measure_exec_overhead(bench, runs=max(runs, 3)))
    result["goals"] = GOALS
    result["met"] = (
        result["cold_ratio"] <= GOALS["cold_ratio_max"]
        and result["warm_lookup_ms"] < GOALS["warm_lookup_ms_max"]
        and result["exec_overhead"] <= GOALS["exec_overhead_max"]
    )
    return result


def measure_exec_overhead(bench: Bench, *, runs: int) -> dict:
    """Time from `python -m runner` to the flow's first line, for the same trivial flow
    run with no env and with a warm env (all ~20 packages): what the switch into the
    env (spec lookup, cache hit, exec, the second interpreter's start) adds."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from devtools.prefect_server import PrefectServer

    bundles = {}
    for name, with_env in (("no_env", False), ("env", True)):
        project = bench.fresh_dir(f"{name}-project-")
        shutil.copy(TRIVIAL_FLOW, project / "trivial.py")
        if with_env:
            shutil.copy(bench.requirements, project / "requirements.txt")
        push = [sys.executable, "-m", "runner", "bundle", "push", str(project)]
        push += ["--to", f"file://{bench.scratch}/bucket"]
        bundles[name] = _check(push, bench.env, "bundle push").strip()

    workdir = bench.fresh_dir("exec-work-")
    samples: dict[str, list[float]] = {"no_env": [], "env": []}
    with PrefectServer(bench.scratch / "prefect") as server:
        env = {**bench.env, **server.env()}
        with (
            temporary_settings(updates={PREFECT_API_URL: server.api_url}),
            get_client(sync_client=True) as client,
        ):
            flow_id = client.create_flow_from_name("first-line")
            deployments = {
                name: client.create_deployment(
                    flow_id=flow_id,
                    name=f"bench-{name}",
                    entrypoint="trivial.py:first_line",
                    pull_steps=[{"runner.steps.pull_bundle": {"url": url}}],
                )
                for name, url in bundles.items()
            }

            def first_line(name: str) -> float:
                stamp = bench.scratch / f"{name}-{time.time_ns()}.stamp"
                run = client.create_flow_run_from_deployment(
                    deployments[name], parameters={"stamp": str(stamp)}
                )
                command = [sys.executable, "-m", "runner", "--flow-run-id", str(run.id)]
                command += ["--workdir", str(workdir), "--index-url", bench.index_url]
                started = time.time()
                _check(command, env, f"runner ({name})")
                return float(stamp.read_text()) - started

            first_line("env")  # builds the env and warms both bundles' caches
            first_line("no_env")
            for i in range(runs):
                for name in ("no_env", "env") if i % 2 == 0 else ("env", "no_env"):
                    samples[name].append(first_line(name))
    no_env, with_env = (statistics.median(samples[k]) for k in ("no_env", "env"))
    return {
        "first_line_s": {"no_env": round(no_env, 3), "warm_env": round(with_env, 3)},
        "exec_overhead": round(with_env / no_env - 1, 3),
    }


def measure_pip(bench: Bench) -> dict[str, float]:
    """The baseline, cold: a new stdlib venv and pip with its cache disabled."""
    venv = bench.fresh_dir("pip-") / "venv"
    started = time.perf_counter()
    _check([sys.executable, "-m", "venv", str(venv)], bench.env, "python -m venv")
    created = time.perf_counter()
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--no-cache-dir"]
    pip += ["-r", str(bench.requirements), "--index-url", bench.index_url]
    _check(pip, bench.env, "pip install")
    finished = time.perf_counter()
    _check_imports(venv / "bin" / "python", bench.env)
    return {
        "pip": finished - started,
        "pip_venv": created - started,
        "pip_install": finished - created,
    }


def measure_runner(bench: Bench) -> dict[str, float]:
    """``runner env build`` cold (fresh workdir and uv cache), then warm in the same workdir."""
    workdir = bench.fresh_dir("runner-")
    env = {**bench.env, "UV_CACHE_DIR": str(bench.fresh_dir("uv-cache-"))}
    cold_wall, cold = _env_build(bench, workdir, env)
    if cold.get("cache_hit") is not False:
        raise SystemExit(f"runner env build: a fresh workdir reported a cache hit: {cold}")
    _check_imports(Path(cold["path"]) / "bin" / "python", bench.env)
    warm_wall, warm = _env_build(bench, workdir, env)
    if warm.get("cache_hit") is not True or warm.get("key") != cold.get("key"):
        raise SystemExit(f"runner env build: the second build was no cache hit: {warm}")
    return {
        "runner_cold": cold_wall,
        "runner_warm_wall": warm_wall,
        "runner_warm_lookup": float(warm["seconds"]),
    }


def _env_build(bench: Bench, workdir: Path, env: dict[str, str]) -> tuple[float, dict]:
    """One ``runner env build --json``: its wall time and the JSON line it printed last."""
    command = [sys.executable, "-m", "runner", "env", "build", str(bench.requirements)]
    command += ["--index-url", bench.index_url, "--workdir", str(workdir), "--json"]
    started = time.perf_counter()
    stdout = _check(command, env, "runner env build")
    wall = time.perf_counter() - started
    lines = stdout.strip().splitlines()
    try:
        return wall, json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise SystemExit(f"runner env build printed no JSON line: {stdout[-2000:]!r}") from exc


def _check_imports(python: Path, env: dict[str, str]) -> None:
    """The env really holds the packages (not timed)."""
    _check([str(python), "-c", f"import {TOP_MODULE}, rvm_plugin"], env, f"importing {TOP_MODULE}")


def _check(command: list[str], env: dict[str, str], doing: str) -> str:
    """Run ``command``; its stdout, or exit with its stderr's tail when it fails."""
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write((done.stderr or done.stdout)[-3000:])
        raise SystemExit(f"{doing} failed (exit {done.returncode})")
    return done.stdout


if __name__ == "__main__":
    raise SystemExit(main())
