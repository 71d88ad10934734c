"""Lifecycle benchmark: how fast a run ends, `python -m runner` vs `prefect flow-run execute`.

Same local Prefect server, same kind of deployment (code in a local directory), the
two tools alternating (runner, prefect, prefect, runner, ...). Three measures, each
in seconds:

- ``cancel_to_cancelled``: the run is set ``Cancelling`` (as the UI does) while its
  flow sleeps; until the server shows it ``Cancelled``;
- ``sigterm_to_rescheduled``: SIGTERM to the started process while the flow sleeps
  (``PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=reschedule`` for Prefect; the runner
  reschedules by default); until the server shows it ``Scheduled`` (AwaitingRetry);
- ``flow_end_to_exit``: from the flow body's last statement to the exit of the started
  process (the runner with its default heartbeats and ``--on-exit none``).

States are polled every 10 ms through the REST API; a figure ends at the state's own
timestamp (when its proposal was made), so the poll's period does not blur it. Prints
one JSON line: the medians, the runner/prefect ratios (goal: at most 0.5 each) and the
runner's flow end to exit (goal: at most 1 s). A measure that a tool cannot complete
(no state within 60 s, a process that fails) is null, with the reason under
``failures``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import psutil

from devtools.prefect_server import PrefectServer

FLOWS = Path(__file__).resolve().parent / "flows"
TOOLS = ("runner", "prefect")
MEASURES = ("cancel_to_cancelled", "sigterm_to_rescheduled", "flow_end_to_exit")
GOALS = {"ratio_max": 0.5, "flow_end_to_exit_s_max": 1.0}
_POLL = 0.01
_START_TIMEOUT = 90.0  # until the flow body runs (process start, claim, code load)
_STATE_TIMEOUT = 60.0  # until the state a measure waits for
_EXIT_TIMEOUT = 30.0  # until the process exits once that state is reached


class _Failed(Exception):
    """A sample that could not be taken; the message says why."""


class _Started:
    """A started tool; a thread waits on it and records when it exited (time.time())."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.started_at = time.time()
        with log.open("wb") as out:
            # Its own process group, so that what it starts can be stopped with it.
            self.proc = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.exited_at: float | None = None
        self._exited = threading.Event()
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        self.proc.wait()
        self.exited_at = time.time()
        self._exited.set()

    def alive(self) -> bool:
        return not self._exited.is_set()

    def wait(self, timeout: float) -> bool:
        return self._exited.wait(timeout)

    def tail(self, chars: int = 300) -> str:
        try:
            text = self.log.read_text(errors="replace").strip()
        except OSError:
            return ""
        return text[-chars:].replace("\n", " | ")

    def stop(self, *extra_pids: int) -> None:
        """Kills it (its process group) if it still runs, and the flow's own process."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.wait(10)
        for pid in extra_pids:  # only the flow's process, not a later one with its pid
            try:
                flow = psutil.Process(pid)
                if flow.create_time() >= self.started_at - 1:
                    flow.kill()
            except psutil.Error:
                pass


class Bench:
    def __init__(self, server: PrefectServer, scratch: Path) -> None:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self.server = server
        self.scratch = scratch
        self.env = {**os.environ, **server.env()}
        self.http = httpx.Client(base_url=server.api_url, timeout=10)
        self._settings = temporary_settings(updates={PREFECT_API_URL: server.api_url})
        self._settings.__enter__()
        self.client = get_client(sync_client=True)
        self.client.__enter__()
        self.deployments = {
            name: self._deployment(name, entrypoint)
            for name, entrypoint in (
                ("sleeper", "lifecycle.py:sleeper"),
                ("stamp_end", "lifecycle.py:stamp_end"),
            )
        }

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        self._settings.__exit__(None, None, None)
        self.http.close()

    def _deployment(self, flow_name: str, entrypoint: str) -> object:
        flow_id = self.client.create_flow_from_name(flow_name)
        return self.client.create_deployment(
            flow_id=flow_id, name="bench-lifecycle", entrypoint=entrypoint, path=str(FLOWS)
        )

    # -- helpers -------------------------------------------------------------------

    def _start(self, tool: str, measure: str, parameters: dict) -> tuple[str, _Started]:
        run = self.client.create_flow_run_from_deployment(
            self.deployments["stamp_end" if measure == "flow_end_to_exit" else "sleeper"],
            parameters=parameters,
        )
        run_id = str(run.id)
        env = dict(self.env)
        if tool == "runner":
            command = [sys.executable, "-m", "runner", "--flow-run-id", run_id]
            command += ["--workdir", str(self.scratch / "work"), "--on-exit", "none"]
        else:
            command = [sys.executable, "-m", "prefect", "flow-run", "execute", run_id]
            if measure == "sigterm_to_rescheduled":
                env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] = "reschedule"
        log = self.scratch / "logs" / f"{tool}-{measure}-{run_id[:8]}.log"
        return run_id, _Started(command, env, log)

    def _state(self, run_id: str) -> str | None:
        return self._state_json(run_id).get("type")

    def _state_json(self, run_id: str) -> dict:
        response = self.http.get(f"/flow_runs/{run_id}")
        response.raise_for_status()
        return response.json().get("state") or {}

    def _until_state(
        self, run_id: str, want: str, timeout: float, started: _Started | None = None
    ) -> float:
        """Waits for the state; when it was proposed (its timestamp, epoch seconds)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            state = self._state_json(run_id)
            last = state.get("type")
            if last == want:
                return datetime.fromisoformat(state["timestamp"].replace("Z", "+00:00")).timestamp()
            if started is not None and not started.alive():
                raise _Failed(
                    f"exited ({started.proc.returncode}) with the run {last}, not {want}: "
                    f"{started.tail()}"
                )
            time.sleep(_POLL)
        raise _Failed(f"no {want} within {timeout:.0f}s (state {last})")

    def _until_sleeping(self, run_id: str, started: _Started, pid_file: Path) -> int:
        """Waits for the flow body to run (pid file written, run RUNNING); its pid."""
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if not started.alive():
                raise _Failed(f"exited ({started.proc.returncode}) early: {started.tail()}")
            text = pid_file.read_text().strip() if pid_file.exists() else ""
            if text and self._state(run_id) == "RUNNING":
                return int(text)
            time.sleep(_POLL)
        raise _Failed(f"flow not running within {_START_TIMEOUT:.0f}s")

    # -- measures ------------------------------------------------------------------

    def sample(self, tool: str, measure: str) -> dict[str, float]:
        marker = self.scratch / "marks" / uuid.uuid4().hex
        if measure == "flow_end_to_exit":
            return self._flow_end(tool, marker)
        return self._stop_run(tool, measure, marker)

    def _stop_run(self, tool: str, measure: str, pid_file: Path) -> dict[str, float]:
        run_id, started = self._start(tool, measure, {"pid_file": str(pid_file), "seconds": 120})
        flow_pid = 0
        try:
            flow_pid = self._until_sleeping(run_id, started, pid_file)
            t0, asked = time.monotonic(), time.time()
            if measure == "cancel_to_cancelled":
                from prefect.states import Cancelling

                self.client.set_flow_run_state(uuid.UUID(run_id), Cancelling(), force=True)
                proposed = self._until_state(run_id, "CANCELLED", _STATE_TIMEOUT)
            else:
                os.kill(started.proc.pid, signal.SIGTERM)
                proposed = self._until_state(run_id, "SCHEDULED", _STATE_TIMEOUT)
            # To the state's own timestamp (same clock, same machine): the poll's period
            # does not blur a figure of a few tens of milliseconds.
            seconds = proposed - asked
            result = {"s": seconds}
            if started.wait(_EXIT_TIMEOUT):
                result["exit_s"] = time.monotonic() - t0  # to the process's exit, roughly
                result["returncode"] = started.proc.returncode
            else:
                result["exit_s"] = float("nan")  # killed below
            return result
        finally:
            started.stop(*([flow_pid] if flow_pid else []))

    def _flow_end(self, tool: str, stamp: Path) -> dict[str, float]:
        run_id, started = self._start(tool, "flow_end_to_exit", {"stamp": str(stamp)})
        try:
            if not started.wait(_START_TIMEOUT + _STATE_TIMEOUT):
                raise _Failed(f"did not exit within {_START_TIMEOUT + _STATE_TIMEOUT:.0f}s")
            if started.proc.returncode != 0:
                raise _Failed(f"exited {started.proc.returncode}: {started.tail()}")
            if not stamp.exists():
                raise _Failed(f"flow body never ended (run {self._state(run_id)})")
            ended = float(stamp.read_text())
            return {"s": started.exited_at - ended, "returncode": started.proc.returncode}
        finally:
            started.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="runs of each tool (default 5)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="runner-bench-lifecycle-"))
    (scratch / "logs").mkdir()
    (scratch / "marks").mkdir()
    samples: dict[str, dict[str, list[dict[str, float]]]] = {
        m: {t: [] for t in TOOLS} for m in MEASURES
    }
    failures: dict[str, dict[str, list[str]]] = {m: {t: [] for t in TOOLS} for m in MEASURES}
    with PrefectServer(scratch / "prefect") as server:
        bench = Bench(server, scratch)
        try:
            for i in range(args.runs):
                order = TOOLS if i % 2 == 0 else TOOLS[::-1]
                for measure in MEASURES:
                    for tool in order:
                        try:
                            sample = bench.sample(tool, measure)
                        except _Failed as exc:
                            failures[measure][tool].append(str(exc))
                            sys.stderr.write(f"[{i}] {measure} {tool}: FAILED {exc}\n")
                            continue
                        samples[measure][tool].append(sample)
                        sys.stderr.write(
                            f"[{i}] {measure} {tool}: {sample['s']:.3f}s"
                            + (f" (exit {sample['exit_s']:.3f}s)" if "exit_s" in sample else "")
                            + f" rc={sample.get('returncode')}\n"
                        )
        finally:
            bench.close()

    result: dict[str, object] = {"bench": "lifecycle", "runs_each": args.runs}
    medians: dict[str, dict[str, float | None]] = {}
    exits: dict[str, dict[str, float | None]] = {}
    ratios: dict[str, float | None] = {}
    for measure in MEASURES:
        medians[measure] = {t: _median(s["s"] for s in samples[measure][t]) for t in TOOLS}
        if measure != "flow_end_to_exit":
            exits[measure] = {
                t: _median(s["exit_s"] for s in samples[measure][t] if s["exit_s"] == s["exit_s"])
                for t in TOOLS
            }
        runner, prefect = medians[measure]["runner"], medians[measure]["prefect"]
        ratios[measure] = round(runner / prefect, 3) if runner is not None and prefect else None
    result["median_s"] = medians
    result["ratio"] = ratios
    result["stop_to_exit_median_s"] = exits  # t0 to the process's exit, for information
    result["goals"] = GOALS
    runner_end = medians["flow_end_to_exit"]["runner"]
    met = {
        f"{m}_ratio": None if ratios[m] is None else ratios[m] <= GOALS["ratio_max"]
        for m in MEASURES
    }
    met["flow_end_to_exit_s"] = (
        None if runner_end is None else runner_end <= GOALS["flow_end_to_exit_s_max"]
    )
    result["met"] = met
    result["met_all"] = all(v is True for v in met.values())
    result["failures"] = {
        m: {t: f for t, f in by_tool.items() if f}
        for m, by_tool in failures.items()
        if any(by_tool.values())
    }
    print(json.dumps(result))
    _summary(result)
    return 0


def _median(values) -> float | None:
    values = list(values)
    return round(statistics.median(values), 3) if values else None


def _summary(result: dict) -> None:
    lines = [f"lifecycle bench, {result['runs_each']} run(s) of each tool (median seconds):"]
    for measure in MEASURES:
        m = result["median_s"][measure]
        lines.append(
            f"  {measure:24} runner {_fmt(m['runner'])}  prefect {_fmt(m['prefect'])}"
            f"  ratio {_fmt(result['ratio'][measure])}"
            f"  (goal <= {GOALS['ratio_max']}: {result['met'][measure + '_ratio']})"
        )
    lines.append(
        f"  runner flow end -> exit {_fmt(result['median_s']['flow_end_to_exit']['runner'])}s"
        f" (goal <= {GOALS['flow_end_to_exit_s_max']}s: {result['met']['flow_end_to_exit_s']})"
    )
    for measure, by_tool in result["failures"].items():
        for tool, reasons in by_tool.items():
            lines.append(f"  FAILED {measure} {tool} x{len(reasons)}: {reasons[0][:200]}")
    sys.stderr.write("\n".join(lines) + "\n")


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
