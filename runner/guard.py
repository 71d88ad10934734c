"""The guard (parent process): fork the worker, supervise it, report its death, tear down.

The guard exists so that whatever the worker does (OOM-killed, segfault,
SIGKILL, a flow that hangs on the GIL), the flow run still ends in a final
state in Prefect and the teardown still happens, exactly once.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
import uuid
from contextlib import suppress
from dataclasses import replace

from runner import logs, redaction, worker
from runner.channel import Claimed, Container, Error, Finished, Inbox, Sender
from runner.cleanup import clean_up
from runner.crash import WorkerExit, oom_kill_count
from runner.ending import CANCEL, CRASH, FINAL_STATES, RESCHEDULE, Ending, decide
from runner.errors import (
    BootstrapError,
    ConfigError,
    ExitCode,
    RunnerError,
    internal_error_line,
)
from runner.prefect_rest import CLAIMING, RunApi, claim_message, claimed_by_a_runner, connection
from runner.settings import Settings
from runner.supervisor import FORWARDED, REPORT_API_WAIT, Supervisor, reschedule_late
from runner.telemetry.reporter import RunTelemetry
from runner.telemetry.sender import EventSender
from runner.telemetry.summary import ARTIFACT_KEY
from runner.vm import secrets, user_data
from runner.vm.metadata import Detection
from runner.vm.prices import hourly_price
from runner.vm.teardown import Teardown

log = logging.getLogger("runner")


class _Signals:
    """SIGTERM/SIGINT never kill the guard: it notes them (and, while the worker lives,
    stops it: see supervisor.py), then finishes its report and teardown."""

    def __init__(self) -> None:
        self.received: list[str] = []

    def note(self, signum: int, _frame: object) -> None:
        self.received.append(signal.Signals(signum).name)

    def first(self) -> str | None:
        return self.received[0] if self.received else None


def run(settings: Settings, *, teardown: Teardown | None = None) -> ExitCode:
    """Execute the configured flow run and return its exit code; the error line is
    logged before the teardown, which runs once whatever happens."""
    started = time.monotonic()
    signals = _Signals()
    previous = {sig: signal.signal(sig, signals.note) for sig in FORWARDED}
    try:
        try:
            settings = user_data.settle(settings, stopped=signals.first)
            secrets.fetch_api_key(settings)
        except RunnerError as exc:  # no run claimed: say why, and tear down
            log.error("%s", exc)
            if isinstance(exc, user_data.UserDataError):
                _crash_unclaimed(exc)
            (teardown or Teardown(settings))(exit_code=int(exc.exit_code))
            return exc.exit_code
        redaction.watch(settings.secret_env)  # user-data may have brought more secrets
        return _run(settings, signals, teardown or Teardown(settings), started)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # if a failed fork left them


def _run(settings: Settings, signals: _Signals, teardown: Teardown, started: float) -> ExitCode:
    exit_code = ExitCode.BOOTSTRAP_ERROR
    sender = EventSender()
    telemetry = RunTelemetry(
        started=started,
        heartbeat_seconds=settings.heartbeat_seconds,
        metrics_seconds=settings.metrics_seconds,
        emit=sender.send,
    )
    deadline = started + settings.max_runtime if settings.max_runtime else None
    try:
        flow_run_id = settings.run_id()
        logs.capture(settings.workdir / "logs" / f"{flow_run_id}.{os.getpid()}.log")
        connection()  # fail on a missing API URL here, before a worker exists
        exit_code = _fork_and_supervise(settings, flow_run_id, signals, telemetry, deadline)
    except RunnerError as exc:
        log.error("%s", exc)
        exit_code = exc.exit_code
    except Exception as exc:  # a bug or an OS failure: still report and tear down
        log.debug("internal error", exc_info=True)
        log.error("%s", internal_error_line(exc))
        exit_code = ExitCode.BOOTSTRAP_ERROR
    finally:
        try:  # reporting is best effort; the teardown below must happen whatever
            telemetry.close(exit_code=int(exit_code))  # the teardown phase: the last event
            _write_summary(settings, telemetry, sender, int(exit_code))
            sender.close()  # may hand events to Prefect's client (no POST /events): then
            _flush_prefect()  # this sends them
        except Exception as exc:
            log.error("could not finish reporting to Prefect: %s", exc)
        try:
            clean_up(settings, claimed=telemetry.claimed)
        finally:
            teardown(exit_code=int(exit_code))
    return exit_code


def _fork_and_supervise(
    settings: Settings,
    flow_run_id: uuid.UUID,
    signals: _Signals,
    telemetry: RunTelemetry,
    deadline: float | None,
) -> ExitCode:
    if signal_name := signals.first():
        raise BootstrapError(
            f"stopped by {signal_name} before the flow run was started; not executed"
        )
    inbox_fd, sender_fd = os.pipe()
    os.set_blocking(inbox_fd, False)
    # Block the forwarded signals across the fork so that neither process can be
    # stopped by one before it has its own handling in place.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    sys.stdout.flush()
    sys.stderr.flush()
    oom_before = oom_kill_count()
    # Prefect is not imported here: the worker imports it once, in the interpreter that
    # runs the flow (which may be another one: see worker.py); the guard sends its
    # events over plain HTTP (telemetry/sender.py) and imports Prefect only to report a
    # crash, which keeps it small for the whole run. What is imported so far is shared
    # copy-on-write; frozen objects are never visited by GC, so neither process
    # dirties those pages.
    gc.freeze()
    guard_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # the worker: never returns into the guard's code (GC: see worker.py)
        code = int(ExitCode.CRASHED)
        try:
            os.close(inbox_fd)
            # The worker stops on SIGTERM and SIGINT as any process does (the engine
            # turns them into a Crashed state while the flow runs).
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _stop_with_guard(guard_pid)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
            code = worker.run(settings, flow_run_id, Sender(sender_fd))
        finally:
            # Nothing may interrupt the way out, or the child would unwind into the guard.
            signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
            with suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    gc.enable()
    os.close(sender_fd)
    log.info("guard pid %d: worker pid %d started for flow run %s", os.getpid(), pid, flow_run_id)
    inbox = Inbox(inbox_fd)
    try:
        telemetry.worker_pid = pid
        detection = Detection(cloud=settings.cloud, urls=settings.metadata_urls())
        detection.start()
        # Never a long wait: the supervision loop asks for it at the claim.
        telemetry.machine = lambda: detection.result(timeout=0.5)
        supervisor = Supervisor(
            pid, inbox, settings, telemetry, oom_before=oom_before, deadline=deadline
        )
        ended = supervisor.run()
    except BaseException:
        # The guard cannot watch the worker any more: never leave it running unwatched.
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise
    finally:
        os.close(inbox_fd)
    _remove_orphan_container(inbox, ended)
    return _conclude(
        settings,
        flow_run_id,
        inbox,
        ended,
        telemetry,
        rescheduled=supervisor.rescheduled,
        worker_pid=pid,
    )


def _conclude(
    settings: Settings,
    flow_run_id: uuid.UUID,
    inbox: Inbox,
    ended: WorkerExit,
    telemetry: RunTelemetry,
    *,
    rescheduled: bool,
    worker_pid: int,
) -> ExitCode:
    """Carry out how the run ends (runner/ending.py): propose its state where the worker
    did not, so that a run this runner claimed never stays Pending or Running in
    Prefect; return the exit code."""
    claimed = inbox.last(Claimed)
    ending = decide(
        flow_run_id,
        ended,
        claimed=claimed is not None,
        finished=inbox.last(Finished),
        error=inbox.last(Error),
        on_preemption=settings.on_preemption,
    )
    if ending.propose == RESCHEDULE and not rescheduled:  # not done as it was stopped
        run_count = claimed.run_count if claimed else 0
        rescheduled = reschedule_late(settings, ending.message, run_count_at_claim=run_count)
        if not rescheduled:
            ending = ending.refused()
    if ending.propose in (CANCEL, CRASH):
        ending = _report(settings, flow_run_id, ending)
    error = inbox.last(Error)
    if claimed is None and error is not None and CLAIMING in error.message:
        ending = _give_back_unheard_claim(settings, flow_run_id, ending, worker_pid)
    if ended.stop is not None and ended.stop.reason == "preemption":
        telemetry.event(
            "runner.preempted",
            reason=ended.stop.detail,
            policy=settings.on_preemption,
            rescheduled=rescheduled,
        )
    log.log(ending.level, "%s", ending.line)
    return ending.code


def _report(settings: Settings, flow_run_id: uuid.UUID, ending: Ending) -> Ending:
    """Move the run to Cancelled or Crashed, unless it reached a final state already."""
    try:
        with RunApi(flow_run_id, api_wait=min(settings.api_wait, REPORT_API_WAIT)) as api:
            state = api.state()
            if state.get("type") in FINAL_STATES:  # the engine, or a zombie automation
                return ending.already(state["type"], state.get("name") or "", state.get("message"))
            if ending.propose == CANCEL:
                api.cancel(ending.message)
            else:
                api.crash(ending.message)
    except Exception as exc:  # the API is the last thing that can fail; still tear down
        log.error("could not report to Prefect that the run %s: %s", ending.outcome, exc)
    return ending


def _give_back_unheard_claim(
    settings: Settings, flow_run_id: uuid.UUID, ending: Ending, worker_pid: int
) -> Ending:
    """The worker's claim failed for an API that answered 5xx or not at all: the server
    may still have applied one of its tries, which would leave the run Pending, claimed
    by a runner that is gone, for good. If so, it is rescheduled (AwaitingRetry) for
    another machine; the flow never started. Best effort, and quiet: the worker's line
    is the error."""
    try:
        with RunApi(flow_run_id, api_wait=min(settings.api_wait, REPORT_API_WAIT)) as api:
            flow_run = api.read_flow_run()
            state = flow_run.get("state") or {}
            if state.get("type") != "PENDING" or state.get("message") != claim_message(worker_pid):
                return ending
            run_count = int(flow_run.get("run_count") or 0)
            if api.reschedule(
                f"{ending.message}; its claim went in unheard, so it is given back",
                run_count_at_claim=run_count,
            ):
                return replace(ending, message=f"{ending.message}; rescheduled (AwaitingRetry)")
    except Exception as exc:
        log.warning("could not check whether the run was left claimed: %s", exc)
    return ending


def _crash_unclaimed(error: user_data.UserDataError) -> None:
    """User-data that names a run but cannot be used: the VM was started for that run
    and will not run it, so the run ends Crashed with the reason rather than waiting,
    Scheduled, for a VM that is gone. A run that is already past Pending (another
    machine runs it) or claimed by a runner is left alone. Best effort."""
    flow_run_id = error.flow_run_id()
    try:
        run_id = uuid.UUID(flow_run_id or "")
    except ValueError:
        return  # no run to end: the line already said why
    for key, value in error.values.items():  # the file's good lines: its API URL and key
        if key.startswith("PREFECT_"):
            os.environ.setdefault(key, value)
    redaction.watch(error.values.get("RUNNER_SECRET_ENV"))  # the key is masked from here on
    try:
        with RunApi(run_id, api_wait=REPORT_API_WAIT) as api:
            state = api.state()
            waiting = state.get("type") in (None, "SCHEDULED", "PENDING")
            if waiting and not claimed_by_a_runner(state):
                api.crash(f"the VM's user-data cannot be used: {error}")
    except Exception as exc:
        log.error("could not report to Prefect that the run crashed: %s", exc)


def _remove_orphan_container(inbox: Inbox, ended: WorkerExit) -> None:
    """A container CLI killed by a signal (SIGKILL after the grace period) leaves its
    container running the flow, unwatched: remove it."""
    container = inbox.last(Container)
    if container is None or ended.exit_code is not None:
        return
    from runner.environment.image import remove

    log.info("removing container %s, whose CLI was killed", container.name)
    try:
        remove(container.cli, container.name)
    except Exception as exc:  # the report and teardown still come
        log.error("could not remove container %s: %s", container.name, exc)


def _write_summary(
    settings: Settings, telemetry: RunTelemetry, sender: EventSender, exit_code: int
) -> None:
    """The runner-summary artifact on the claimed run; best effort, before the teardown."""
    try:
        price = hourly_price(
            hourly_cost=settings.hourly_cost,
            table_path=settings.price_table,
            machine=telemetry.machine(),
        )
    except ConfigError as exc:  # a cost estimate is never worth failing a run for
        log.error("%s; the run summary has no cost estimate", exc)
        price = None
    markdown = telemetry.summary(exit_code=exit_code, price=price)
    if markdown is None:
        return
    try:
        sender.write_artifact(
            flow_run_id=settings.run_id(),
            key=ARTIFACT_KEY,
            markdown=markdown,
            description="What the machine did for this run (prefect-vm-runner)",
        )
    except Exception as exc:
        log.error("could not write the run summary artifact: %s", exc)


def _flush_prefect() -> None:
    if "prefect" in sys.modules:  # nothing can be queued before Prefect is imported
        from runner.prefect_compat import flush

        flush()


def _stop_with_guard(guard_pid: int) -> None:
    """Have the kernel send the worker SIGTERM if the guard dies (SIGKILL, a crash): a
    worker left alone would run the flow with no heartbeat, no teardown and no final
    state, on a VM nobody stops. SIGTERM, not SIGKILL, so that the engine still reports
    the run Crashed. Linux only (prctl); kept across the exec into a run's env."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != guard_pid:  # the guard died before the call: nobody would signal
        os.kill(os.getpid(), signal.SIGTERM)
