"""The guard (parent process): fork the worker, supervise it, report its death, tear down.

The guard exists so that whatever the worker does (OOM-killed, segfault,
SIGKILL, a flow that hangs on the GIL), the flow run still ends in a final
state in Prefect and the teardown still happens, exactly once.
"""

from __future__ import annotations

import gc
import logging
import os
import selectors
import signal
import socket
import sys
import time
import uuid
from contextlib import suppress

from runner import worker
from runner.bootstrap_api import connection
from runner.cancellation import CancelWatch
from runner.channel import Inbox, Sender
from runner.crash import WorkerExit, oom_kill_count
from runner.errors import (
    BootstrapError,
    ConfigError,
    ExitCode,
    RunnerError,
    exit_code_for_state,
    internal_error_line,
)
from runner.settings import Settings
from runner.telemetry.reporter import RunTelemetry
from runner.telemetry.sender import EventSender
from runner.telemetry.summary import ARTIFACT_KEY
from runner.vm.metadata import Detection
from runner.vm.prices import hourly_price
from runner.vm.teardown import Teardown

log = logging.getLogger("runner")

_FORWARDED = (signal.SIGTERM, signal.SIGINT)
# How long the guard waits for the API when it reports the outcome: the run is
# over, so a short wait; a long one would keep a dead VM billing.
_REPORT_API_WAIT = 30.0


class _Signals:
    """SIGTERM/SIGINT never kill the guard: it notes them (and, while the worker
    lives, forwards them: see _supervise), then finishes its report and teardown."""

    def __init__(self) -> None:
        self.received: list[str] = []

    def note(self, signum: int, _frame: object) -> None:
        self.received.append(signal.Signals(signum).name)


def run(settings: Settings, *, teardown: Teardown | None = None) -> ExitCode:
    """Execute the configured flow run and return its exit code; the error line is
    logged before the teardown, which runs once whatever happens."""
    teardown = teardown or Teardown(settings)
    exit_code = ExitCode.BOOTSTRAP_ERROR
    signals = _Signals()
    sender = EventSender()
    telemetry = RunTelemetry(
        started=time.monotonic(),
        heartbeat_seconds=settings.heartbeat_seconds,
        metrics_seconds=settings.metrics_seconds,
        emit=sender.send,
    )
    previous = {sig: signal.signal(sig, signals.note) for sig in _FORWARDED}
    try:
        flow_run_id = settings.run_id()
        connection()  # fail on a missing API URL here, before a worker exists
        exit_code = _fork_and_supervise(settings, flow_run_id, signals, telemetry)
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
            _flush_prefect()
            sender.close()
        except Exception as exc:
            log.error("could not finish reporting to Prefect: %s", exc)
        teardown(exit_code=int(exit_code))
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)  # if a failed fork left them
    return exit_code


def _fork_and_supervise(
    settings: Settings, flow_run_id: uuid.UUID, signals: _Signals, telemetry: RunTelemetry
) -> ExitCode:
    if signals.received:
        raise BootstrapError(
            f"stopped by {signals.received[0]} before the flow run was started; not executed"
        )
    inbox_fd, sender_fd = os.pipe()
    os.set_blocking(inbox_fd, False)
    # Block the forwarded signals across the fork so that neither process can be
    # stopped by one before it has its own handling in place.
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
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
    pid = os.fork()
    if pid == 0:  # the worker: never returns into the guard's code (GC: see worker.py)
        code = int(ExitCode.CRASHED)
        try:
            os.close(inbox_fd)
            # The worker stops on SIGTERM and SIGINT as any process does (the engine
            # turns them into a Crashed state while the flow runs).
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
            code = worker.run(settings, flow_run_id, Sender(sender_fd))
        finally:
            # Nothing may interrupt the way out, or the child would unwind into the guard.
            signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
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
        telemetry.machine = detection.result
        ended = _supervise(pid, inbox, settings, oom_before, telemetry)
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
    return _conclude(settings, flow_run_id, inbox, ended)


def _supervise(
    pid: int, inbox: Inbox, settings: Settings, oom_before: int, telemetry: RunTelemetry
) -> WorkerExit:
    """Wait for the worker while reading its messages and forwarding SIGTERM/SIGINT."""
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    previous_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)

    pidfd = os.pidfd_open(pid)
    selector = selectors.DefaultSelector()
    selector.register(pidfd, selectors.EVENT_READ, "exited")
    selector.register(inbox.fd, selectors.EVENT_READ, "inbox")
    selector.register(wake_r, selectors.EVENT_READ, "signal")
    # The cancel watch's threads wake this loop through a socket, never by a call into it.
    cancel_r, cancel_w = socket.socketpair()
    cancel_r.setblocking(False)
    selector.register(cancel_r, selectors.EVENT_READ, "cancel")
    watch: CancelWatch | None = None
    cancelled = False
    forwarded: list[str] = []
    kill_at: float | None = None
    killed = False
    seen = 0  # messages already passed on to the telemetry
    try:
        while True:
            timeout = None if kill_at is None else max(0.0, kill_at - time.monotonic())
            for key, _ in selector.select(timeout):
                if key.data == "inbox":
                    if not inbox.drain():
                        selector.unregister(inbox.fd)
                    for message in inbox.messages[seen:]:
                        telemetry.on_message(message)
                    seen = len(inbox.messages)
                    if watch is None and inbox.last("claimed") is not None:
                        watch = CancelWatch(
                            settings.run_id(),
                            poll_seconds=settings.cancel_poll_seconds,
                            on_cancel=lambda: cancel_w.send(b"c"),
                        )
                        watch.start()
                elif key.data == "cancel":
                    cancel_r.recv(64)
                    if not cancelled:
                        cancelled = True
                        log.info("stopping the worker for the cancel (SIGUSR1)")
                        with suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGUSR1)
                        kill_at = kill_at or time.monotonic() + settings.cancel_grace_seconds
                elif key.data == "signal":
                    for signum in wake_r.recv(64):
                        name = signal.Signals(signum).name
                        log.info("guard received %s; forwarding it to the worker", name)
                        forwarded.append(name)
                        with suppress(ProcessLookupError):
                            os.kill(pid, signum)
                        kill_at = kill_at or time.monotonic() + settings.cancel_grace_seconds
                elif key.data == "exited":
                    inbox.drain()
                    for message in inbox.messages[seen:]:
                        telemetry.on_message(message)
                    _, status, usage = os.wait4(pid, 0)
                    return WorkerExit(
                        status=status,
                        peak_rss_bytes=usage.ru_maxrss * 1024,  # Linux reports KiB
                        forwarded=tuple(forwarded),
                        killed_by_guard=killed,
                        oom_kills=oom_kill_count() - oom_before,
                        cancelled=cancelled,
                    )
            if kill_at is not None and not killed and time.monotonic() >= kill_at:
                log.warning(
                    "worker still running %gs after %s; killing it",
                    settings.cancel_grace_seconds,
                    forwarded[-1] if forwarded else "the cancel request",
                )
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed = True
                kill_at = None
    finally:
        if watch is not None:
            watch.stop()
        selector.close()
        cancel_r.close()
        cancel_w.close()
        os.close(pidfd)
        signal.set_wakeup_fd(previous_wakeup)
        wake_r.close()
        wake_w.close()


def _conclude(
    settings: Settings, flow_run_id: uuid.UUID, inbox: Inbox, ended: WorkerExit
) -> ExitCode:
    """Turn what the worker said and how it ended into the exit code, making sure a
    run this runner claimed does not stay Pending or Running in Prefect."""
    finished, error = inbox.last("finished"), inbox.last("error")
    if finished and ended.exit_code is not None:
        log.info("flow run %s finished: %s", flow_run_id, finished["name"])
        return exit_code_for_state(finished["state"])
    if inbox.last("claimed") is None:
        # Not ours (already claimed elsewhere) or never reached: leave its state alone.
        if error:
            log.error("%s", error["message"])
            return ExitCode(error["exit_code"])
        log.error("flow run %s not claimed: %s", flow_run_id, ended.describe())
        return ExitCode.CRASHED

    message = error["message"] if error else ended.describe()
    code = ExitCode(error["exit_code"]) if error else ExitCode.CRASHED
    outcome = "crashed"
    if ended.cancelled:
        # The flow's engine moves a cancelled run on itself (and runs its on_cancellation
        # hooks); a worker stopped before or without that leaves the guard to do it.
        message = f"cancelled; the flow's engine did not finish the cancel ({message})"
        code, outcome = ExitCode.FLOW_FAILED, "cancelled"
    try:
        from runner.prefect_api import PrefectApi

        with PrefectApi.connect(
            flow_run_id, api_wait=min(settings.api_wait, _REPORT_API_WAIT)
        ) as api:
            state = api.read_flow_run().state
            if state is not None and state.is_final():
                log.info("flow run %s ended %s: %s", flow_run_id, state.name, state.message or "")
                return exit_code_for_state(state.type.value)
            if ended.cancelled:
                api.cancel(message)
                log.info("flow run %s cancelled: %s", flow_run_id, message)
                return code
            api.crash(message)
    except Exception as exc:  # the API is the last thing that can fail; still tear down
        log.error("could not report to Prefect that the run %s: %s", outcome, exc)
    log.error("flow run %s %s: %s", flow_run_id, outcome, message)
    return code


def _remove_orphan_container(inbox: Inbox, ended: WorkerExit) -> None:
    """A container CLI killed by a signal (SIGKILL after the grace period) leaves its
    container running the flow, unwatched: remove it."""
    container = inbox.last("container")
    if container is None or ended.exit_code is not None:
        return
    from runner.environment.image import remove

    log.info("removing container %s, whose CLI was killed", container["name"])
    try:
        remove(container["cli"], container["name"])
    except Exception as exc:  # the report and teardown still come
        log.error("could not remove container %s: %s", container["name"], exc)


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
        from runner.prefect_api import flush_prefect

        flush_prefect()
