"""The guard's loop while the worker lives: pass its messages on, and stop it (politely,
then with SIGKILL) for a cancel, a preemption, ``--max-runtime`` or a SIGINT."""

from __future__ import annotations

import logging
import os
import queue
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress

from runner.cancellation import CancelWatch
from runner.channel import STOP_SIGNALS, Claimed, Finished, Inbox
from runner.crash import Stop, WorkerExit, oom_kill_count
from runner.ending import may_reschedule, reschedules_at_stop
from runner.prefect_rest import RunApi
from runner.settings import Settings
from runner.telemetry.reporter import RunTelemetry
from runner.vm.metadata import cloud_from_dmi
from runner.vm.spot import SpotWatch

log = logging.getLogger("runner")

# How long the API may take to accept a reschedule or a final state: the run is over, so
# a short wait; a long one would keep a dead VM billing.
REPORT_API_WAIT = 30.0

FORWARDED = (signal.SIGTERM, signal.SIGINT)


class Supervisor:
    """``Supervisor(pid, inbox, settings, telemetry, ...).run()`` returns how the worker
    ended. Everything that can stop it (signals, the cancel and spot watches' threads,
    the deadline) arrives as a wake-up of one selector loop, which never waits on the
    network: the watches do that in their own threads."""

    def __init__(
        self,
        pid: int,
        inbox: Inbox,
        settings: Settings,
        telemetry: RunTelemetry,
        *,
        oom_before: int,
        deadline: float | None,
    ) -> None:
        self._pid = pid
        self._inbox = inbox
        self._settings = settings
        self._telemetry = telemetry
        self._oom_before = oom_before
        self._deadline = deadline  # monotonic time of --max-runtime, or None
        self._notices: queue.SimpleQueue[Stop] = queue.SimpleQueue()
        self._notice_r, self._notice_w = socket.socketpair()
        self._watches: list[CancelWatch | SpotWatch] = []
        self._stop: Stop | None = None
        self._kill_at: float | None = None
        self._killed = False
        self._seen = 0  # messages already passed on to the telemetry
        self._rescheduling: threading.Thread | None = None
        self.rescheduled = False  # AwaitingRetry accepted (and retries given back) early
        # Made at the claim, where it costs nothing: a reschedule then is one request, not
        # the 20 ms of setting up a client first.
        self._api: RunApi | None = None

    def notify(self, stop: Stop) -> None:
        """Ask for the worker to be stopped; from any thread."""
        self._notices.put(stop)
        with suppress(OSError):  # the loop is over and the socket closed: nothing to stop
            self._notice_w.send(b"!")

    def run(self) -> WorkerExit:
        pidfd = os.pidfd_open(self._pid)  # first: it is the one step here that can fail
        wake_r, wake_w = socket.socketpair()
        for sock in (wake_r, wake_w, self._notice_r, self._notice_w):
            sock.setblocking(False)
        previous_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        selector = selectors.DefaultSelector()
        handlers: dict[str, Callable[[], WorkerExit | None]] = {
            "exited": self._exited,
            "inbox": self._read_inbox,
            "signal": lambda: self._signals(wake_r.recv(64)),
            "notice": self._read_notices,
        }
        selector.register(pidfd, selectors.EVENT_READ, "exited")
        selector.register(self._inbox.fd, selectors.EVENT_READ, "inbox")
        selector.register(wake_r, selectors.EVENT_READ, "signal")
        selector.register(self._notice_r, selectors.EVENT_READ, "notice")
        self._watch_for_spot_notices()
        try:
            while True:
                for key, _ in selector.select(self._timeout()):
                    if key.data == "inbox" and not self._inbox.drain():
                        selector.unregister(self._inbox.fd)  # the worker closed its end
                    if (ended := handlers[key.data]()) is not None:
                        return ended
                self._check_clocks()
        finally:
            for watch in self._watches:
                watch.stop()
            if self._rescheduling is not None:
                self._rescheduling.join()  # bounded by the API wait: the outcome needs it
            if self._api is not None:
                self._api.close()
            selector.close()
            self._notice_r.close()
            self._notice_w.close()
            os.close(pidfd)
            signal.set_wakeup_fd(previous_wakeup)
            wake_r.close()
            wake_w.close()

    def _pass_on_messages(self) -> None:
        for message in self._inbox.messages[self._seen :]:
            self._telemetry.on_message(message)
        self._seen = len(self._inbox.messages)

    def _read_inbox(self) -> None:
        self._pass_on_messages()
        if self._api is None and self._inbox.last(Claimed) is not None:  # just claimed
            self._api = RunApi(
                self._settings.run_id(),
                api_wait=min(self._settings.api_wait, REPORT_API_WAIT),
            )
            watch = CancelWatch(
                self._settings.run_id(),
                poll_seconds=self._settings.cancel_poll_seconds,
                on_cancel=lambda: self.notify(Stop("cancel", "the cancel request")),
            )
            watch.start()
            self._watches.append(watch)

    def _watch_for_spot_notices(self) -> None:
        cloud = self._settings.cloud
        if cloud == "auto":
            cloud = cloud_from_dmi()  # a file read; off-cloud it says "none"
        # Off a known cloud, or with polling off, start() does nothing.
        watch = SpotWatch(
            cloud,
            self._settings.metadata_urls(),
            poll_seconds=self._settings.spot_poll_seconds,
            on_notice=lambda why: self.notify(Stop("preemption", why)),
        )
        watch.start()
        self._watches.append(watch)

    def _read_notices(self) -> None:
        with suppress(BlockingIOError):
            self._notice_r.recv(64)
        while True:
            try:
                self._ask(self._notices.get_nowait())
            except queue.Empty:
                return

    def _signals(self, received: bytes) -> None:
        for signum in received:
            name = signal.Signals(signum).name
            if signum == signal.SIGTERM:  # what a cloud shutdown or `docker stop` sends
                self._ask(Stop("preemption", name))
            else:
                self._ask(Stop("interrupt", name))

    def _ask(self, stop: Stop) -> None:
        """Ask the worker to stop, once: the first reason is the one the run ends with."""
        if self._stop is not None:
            log.info("%s while already stopping the worker (%s)", stop.detail, self._stop.detail)
            return
        self._stop = stop
        asked = STOP_SIGNALS[stop.reason]
        log.info("stopping the worker (%s) for the %s: %s", asked.name, stop.reason, stop.detail)
        with suppress(ProcessLookupError):
            os.kill(self._pid, asked)
        self._kill_at = time.monotonic() + self._settings.cancel_grace_seconds
        finished = self._inbox.last(Finished) is not None  # its state is final already
        policy = self._settings.on_preemption
        if self._api and reschedules_at_stop(stop, on_preemption=policy, finished=finished):
            # As Prefect's supervisor does: as the engine is told to stop without a state.
            self._rescheduling = threading.Thread(
                target=self._reschedule_now,
                args=(self._api, f"preempted ({stop.detail})"),
                name="runner-reschedule",
                daemon=True,
            )
            self._rescheduling.start()

    def _reschedule_now(self, api: RunApi, message: str) -> None:
        claimed = self._inbox.last(Claimed)
        try:
            self.rescheduled = api.reschedule(
                message, run_count_at_claim=claimed.run_count if claimed else 0
            )
        except Exception as exc:  # the guard's conclusion tries again once the worker is gone
            log.warning("could not reschedule the run yet: %s", exc)

    def _timeout(self) -> float | None:
        # The deadline counts until the worker is being stopped; then the kill time does.
        clock = self._kill_at if self._stop else self._deadline
        return None if clock is None else max(0.0, clock - time.monotonic())

    def _check_clocks(self) -> None:
        now = time.monotonic()
        if self._stop is None and self._deadline is not None and now >= self._deadline:
            limit = self._settings.max_runtime
            self._ask(Stop("max-runtime", f"exceeded max runtime of {limit:g}s"))
        if self._kill_at is not None and not self._killed and now >= self._kill_at:
            assert self._stop is not None
            log.warning(
                "worker still running %gs after %s; killing it",
                self._settings.cancel_grace_seconds,
                self._stop.detail,
            )
            with suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            self._killed = True
            self._kill_at = None

    def _exited(self) -> WorkerExit:
        self._inbox.drain()
        self._pass_on_messages()
        _, status, usage = os.wait4(self._pid, 0)
        return WorkerExit(
            status=status,
            peak_rss_bytes=usage.ru_maxrss * 1024,  # Linux reports KiB
            stop=self._stop,
            killed_by_guard=self._killed,
            oom_kills=oom_kill_count() - self._oom_before,
        )


def reschedule_late(settings: Settings, message: str, *, run_count_at_claim: int) -> bool:
    """After the worker is gone, where the reschedule as it was stopped did not happen (the
    API failed then): propose AwaitingRetry, where the run may still be (ending.py), and
    give the attempts this runner started back to its retries. False when not
    rescheduled."""
    try:
        with RunApi(settings.run_id(), api_wait=min(settings.api_wait, REPORT_API_WAIT)) as api:
            if not may_reschedule(api.state().get("type")):
                return False
            return api.reschedule(message, run_count_at_claim=run_count_at_claim)
    except Exception as exc:  # a run that is not rescheduled is crashed instead
        log.error("could not reschedule the run: %s", exc)
        return False
