"""How a run ends (runner/ending.py): the whole table, from what the guard saw of its worker
to the state it proposes, the exit code and the log line."""

from __future__ import annotations

import logging
import signal

import pytest

from runner.channel import Error, Finished
from runner.crash import Stop, WorkerExit
from runner.ending import (
    CANCEL,
    CRASH,
    RESCHEDULE,
    decide,
    may_reschedule,
    reschedules_at_stop,
)
from runner.errors import ExitCode

RUN = "0b5c8a3e-0000-4000-8000-000000000001"
GiB = 1024**3


def exited(code: int, stop: Stop | None = None) -> WorkerExit:
    return WorkerExit(status=code << 8, peak_rss_bytes=GiB, stop=stop, memory_limit_bytes=8 * GiB)


def killed(sig: signal.Signals, stop: Stop | None = None, *, by_guard: bool = False) -> WorkerExit:
    return WorkerExit(
        status=int(sig),
        peak_rss_bytes=GiB,
        stop=stop,
        killed_by_guard=by_guard,
        memory_limit_bytes=8 * GiB,
    )


CANCELLED_BY = Stop("cancel", "the cancel request")
PREEMPTED = Stop("preemption", "SIGTERM")
TOO_LONG = Stop("max-runtime", "exceeded max runtime of 60s")
INTERRUPTED = Stop("interrupt", "SIGINT")
BAD_SPEC = Error("the env spec is not JSON", int(ExitCode.CONFIG_ERROR))

# (case, worker exit, claimed, finished, error, policy) ->
#   (outcome, state proposed, exit code, level, the line's words)
TABLE = [
    (
        "the engine reported Completed",
        exited(0), True, Finished("COMPLETED", "Completed"), None, "reschedule",
        ("finished", None, ExitCode.COMPLETED, logging.INFO, "finished: Completed"),
    ),
    (
        "the engine reported Failed",
        exited(1), True, Finished("FAILED", "Failed"), None, "reschedule",
        ("finished", None, ExitCode.FLOW_FAILED, logging.INFO, "finished: Failed"),
    ),
    (
        "the engine reported Cancelled on a cancel",
        exited(143, CANCELLED_BY), True, Finished("CANCELLED", "Cancelled"), None, "reschedule",
        ("finished", None, ExitCode.FLOW_FAILED, logging.INFO, "finished: Cancelled"),
    ),
    (
        "finished, then preempted before the worker left: the state stands",
        killed(signal.SIGKILL, PREEMPTED), True, Finished("COMPLETED", "Completed"), None,
        "reschedule",
        ("finished", None, ExitCode.COMPLETED, logging.INFO, "finished: Completed"),
    ),
    (
        "not claimed: another runner has it",
        exited(4), False, None, Error("flow run x is already Running", 4), "reschedule",
        ("not claimed", None, ExitCode.NOT_EXECUTED, logging.ERROR,
         "flow run x is already Running"),
    ),
    (
        "not claimed: the worker died before the claim",
        killed(signal.SIGKILL), False, None, None, "reschedule",
        ("not claimed", None, ExitCode.CRASHED, logging.ERROR,
         f"flow run {RUN} not claimed: worker process was killed by SIGKILL"),
    ),
    (
        "claimed, then an error line (a bad spec)",
        exited(2), True, None, BAD_SPEC, "reschedule",
        ("crashed", CRASH, ExitCode.CONFIG_ERROR, logging.ERROR, "the env spec is not JSON"),
    ),
    (
        "claimed, then the worker was OOM-killed",
        killed(signal.SIGKILL), True, None, None, "reschedule",
        ("crashed", CRASH, ExitCode.CRASHED, logging.ERROR, "killed by SIGKILL"),
    ),
    (
        "claimed, then the worker exited without a state",
        exited(0), True, None, None, "reschedule",
        ("crashed", CRASH, ExitCode.CRASHED, logging.ERROR,
         "exited with code 0 before reporting a final state"),
    ),
    (
        "SIGINT: crashed, as any interrupted process",
        killed(signal.SIGINT, INTERRUPTED), True, None, None, "reschedule",
        ("crashed", CRASH, ExitCode.CRASHED, logging.ERROR, "killed by SIGINT"),
    ),
    (
        "cancel, the engine did not finish it",
        exited(143, CANCELLED_BY), True, None, None, "reschedule",
        ("cancelled", CANCEL, ExitCode.FLOW_FAILED, logging.WARNING,
         "cancelled: cancelled; the flow's engine did not finish the cancel"),
    ),
    (
        "cancel, the worker had to be killed",
        killed(signal.SIGKILL, CANCELLED_BY, by_guard=True), True, None, None, "crash",
        ("cancelled", CANCEL, ExitCode.FLOW_FAILED, logging.WARNING,
         "did not stop after the cancel request and was killed"),
    ),
    (
        "past --max-runtime",
        exited(143, TOO_LONG), True, None, None, "reschedule",
        ("crashed", CRASH, ExitCode.CRASHED, logging.ERROR, "exceeded max runtime of 60s"),
    ),
    (
        "past --max-runtime, killed after the grace period",
        killed(signal.SIGKILL, TOO_LONG, by_guard=True), True, None, None, "reschedule",
        ("crashed", CRASH, ExitCode.CRASHED, logging.ERROR,
         "exceeded max runtime of 60s; worker did not stop after"),
    ),
    (
        "preempted, reschedule policy",
        exited(143, PREEMPTED), True, None, None, "reschedule",
        ("rescheduled", RESCHEDULE, ExitCode.COMPLETED, logging.WARNING,
         "rescheduled: preempted (SIGTERM)"),
    ),
    (
        "preempted, crash policy",
        exited(143, PREEMPTED), True, None, None, "crash",
        ("crashed", CRASH, ExitCode.CRASHED, logging.ERROR, "crashed: preempted (SIGTERM)"),
    ),
    (
        "preempted and killed after the grace period",
        killed(signal.SIGKILL, PREEMPTED, by_guard=True), True, None, None, "reschedule",
        ("rescheduled", RESCHEDULE, ExitCode.COMPLETED, logging.WARNING,
         "preempted (SIGTERM); worker did not stop after SIGTERM and was killed"),
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("exit", "claimed", "finished", "error", "policy", "expected"),
    [case[1:] for case in TABLE],
    ids=[case[0] for case in TABLE],
)
def test_how_a_run_ends(exit, claimed, finished, error, policy, expected):
    outcome, proposed, code, level, words = expected
    ending = decide(
        RUN, exit, claimed=claimed, finished=finished, error=error, on_preemption=policy
    )
    assert (ending.outcome, ending.propose, ending.code, ending.level) == expected[:4]
    assert words in ending.line
    assert outcome in ending.line or outcome == "not claimed"


def test_a_refused_reschedule_crashes_the_run():
    ending = decide(
        RUN, exited(143, PREEMPTED), claimed=True, finished=None, error=None,
        on_preemption="reschedule",
    ).refused()  # fmt: skip
    assert (ending.outcome, ending.propose, ending.code) == ("crashed", CRASH, ExitCode.CRASHED)
    assert ending.line.endswith("preempted (SIGTERM); the server refused to reschedule it")
    assert ending.level == logging.ERROR


@pytest.mark.parametrize(
    ("state", "name", "code", "level"),
    [
        ("COMPLETED", "Completed", ExitCode.COMPLETED, logging.WARNING),
        ("FAILED", "Failed", ExitCode.FLOW_FAILED, logging.WARNING),
        ("CANCELLED", "Cancelled", ExitCode.FLOW_FAILED, logging.WARNING),
        ("CRASHED", "Crashed", ExitCode.CRASHED, logging.ERROR),
    ],
)
def test_a_run_final_before_the_guard_spoke_keeps_its_state(state, name, code, level):
    ending = decide(
        RUN, killed(signal.SIGKILL), claimed=True, finished=None, error=None,
        on_preemption="reschedule",
    ).already(state, name, "zombie: no heartbeat")  # fmt: skip
    assert (ending.outcome, ending.propose, ending.code, ending.level) == (
        f"ended {name}",
        None,
        code,
        level,
    )
    assert ending.line == f"flow run {RUN} ended {name}: zombie: no heartbeat"


@pytest.mark.parametrize(
    ("stop", "policy", "finished", "at_once"),
    [
        (PREEMPTED, "reschedule", False, True),
        (PREEMPTED, "reschedule", True, False),  # finished: its state is final already
        (PREEMPTED, "crash", False, False),
        (CANCELLED_BY, "reschedule", False, False),
        (TOO_LONG, "reschedule", False, False),
        (INTERRUPTED, "reschedule", False, False),
    ],
)
def test_the_guard_reschedules_as_it_stops_only_a_preempted_unfinished_run(
    stop, policy, finished, at_once
):
    assert reschedules_at_stop(stop, on_preemption=policy, finished=finished) is at_once


@pytest.mark.parametrize(
    ("state", "may"),
    [
        (None, True),
        ("SCHEDULED", True),
        ("PENDING", True),
        ("RUNNING", True),
        ("CRASHED", True),  # the crash may be the stop's own
        ("COMPLETED", False),
        ("FAILED", False),
        ("CANCELLED", False),
    ],
)
def test_a_run_that_ended_on_its_own_is_not_rescheduled_late(state, may):
    assert may_reschedule(state) is may
