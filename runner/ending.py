"""How a run ends, decided here and nowhere else: from how the worker ended, what it said,
why the guard stopped it and the preemption policy, the state the guard proposes, the
exit code and the log line. Pure (no I/O): the guard and the supervisor carry it out."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from runner.channel import Error, Finished
from runner.crash import Stop, WorkerExit
from runner.errors import ExitCode, exit_code_for_state

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})

# What the guard proposes for the run (None: it leaves the state alone).
CANCEL = "Cancelled"
CRASH = "Crashed"
RESCHEDULE = "AwaitingRetry"


@dataclass(frozen=True)
class Ending:
    """``outcome`` is what happened, for people: finished, not claimed, cancelled,
    rescheduled, crashed, or "ended <state>" (final before the guard's word)."""

    flow_run_id: str
    outcome: str
    message: str
    code: ExitCode
    propose: str | None = None

    @property
    def line(self) -> str:
        """The guard's last line about the run."""
        if self.outcome == "finished":
            return f"flow run {self.flow_run_id} finished: {self.message}"
        if self.outcome == "not claimed":
            return self.message
        return f"flow run {self.flow_run_id} {self.outcome}: {self.message}"

    @property
    def level(self) -> int:
        if self.outcome == "finished":
            return logging.INFO
        failed = self.outcome in ("not claimed", "crashed") or self.code == ExitCode.CRASHED
        return logging.ERROR if failed else logging.WARNING

    def refused(self) -> Ending:
        """The server would not reschedule the run: it crashes instead."""
        message = f"{self.message}; the server refused to reschedule it"
        return replace(
            self, outcome="crashed", message=message, code=ExitCode.CRASHED, propose=CRASH
        )

    def already(self, state_type: str, name: str, message: str | None) -> Ending:
        """The run was final before the guard proposed anything (the engine got there, or a
        zombie automation): its state stands, and gives the exit code."""
        code = exit_code_for_state(state_type)
        return replace(
            self, outcome=f"ended {name}", message=message or "", code=code, propose=None
        )


def decide(
    flow_run_id: object,
    ended: WorkerExit,
    *,
    claimed: bool,
    finished: Finished | None,
    error: Error | None,
    on_preemption: str,
) -> Ending:
    """How the run ends, from what the guard saw of its worker."""
    run = str(flow_run_id)
    if finished:  # the engine reported the final state (the worker may have died after)
        return Ending(run, "finished", finished.name, exit_code_for_state(finished.state))
    if not claimed:  # not ours (claimed elsewhere) or never reached: its state is left alone
        if error:
            return Ending(run, "not claimed", error.message, ExitCode(error.exit_code))
        return Ending(
            run, "not claimed", f"flow run {run} not claimed: {ended.describe()}", ExitCode.CRASHED
        )
    why = error.message if error else ended.describe()
    stop = ended.stop
    if stop is None or stop.reason == "interrupt":
        code = ExitCode(error.exit_code) if error else ExitCode.CRASHED
        return Ending(run, "crashed", why, code, CRASH)
    if stop.reason == "cancel":
        # The flow's engine moves a cancelled run on itself (and runs its on_cancellation
        # hooks); a worker stopped before or without that leaves it to the guard.
        message = f"cancelled; the flow's engine did not finish the cancel ({why})"
        return Ending(run, "cancelled", message, ExitCode.FLOW_FAILED, CANCEL)
    killed = f"; {ended.describe()}" if ended.killed_by_guard else ""
    if stop.reason == "max-runtime":
        return Ending(run, "crashed", f"{stop.detail}{killed}", ExitCode.CRASHED, CRASH)
    message = f"preempted ({stop.detail}){killed}"
    if on_preemption == "reschedule":
        # Exit 0, as `prefect flow-run execute` does: a Prefect worker that sees a
        # non-zero exit would propose Crashed over the rescheduled run.
        return Ending(run, "rescheduled", message, ExitCode.COMPLETED, RESCHEDULE)
    return Ending(run, "crashed", message, ExitCode.CRASHED, CRASH)


def reschedules_at_stop(stop: Stop, *, on_preemption: str, finished: bool) -> bool:
    """Whether the guard proposes AwaitingRetry as it stops the worker, not once it is gone
    (its exit, which flushes logs, takes about a second a spot VM may not have): for a
    preemption under the reschedule policy, unless the run has finished already."""
    return stop.reason == "preemption" and on_preemption == "reschedule" and not finished


def may_reschedule(state_type: str | None) -> bool:
    """Whether a run in this state may still be rescheduled: not one that ended on its own
    before the stop (a Crashed one may: the crash may be the stop's)."""
    return state_type not in FINAL_STATES - {"CRASHED"}
