"""runner/prefect_compat.py against the installed Prefect: each internal it uses is found
where this Prefect has it, and a release that moves or renames one fails here, loudly,
instead of the runner falling back in silence. `make test` runs these on the newest
supported Prefect, `make test-compat` on the oldest."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import prefect
from prefect import flow_engine

from runner import prefect_compat

PREFECT_SOURCE = Path(prefect.__file__).parent


def test_the_engine_can_be_told_what_it_reads():
    """Where the flow engine reads the control listener's intent, the runner can set it:
    a rename of ``_set_intent`` or ``Intent`` would otherwise turn every cancel into the
    fallback."""
    engine_reads_intents = "control_listener" in inspect.getsource(flow_engine)
    intents = prefect_compat.engine_intents()
    assert bool(intents) == engine_reads_intents, intents
    if not intents:
        assert prefect_compat.tell_engine("cancel") is False
        return
    from prefect._internal import control_listener

    assert "cancel" in intents
    try:
        for intent in intents:
            assert prefect_compat.tell_engine(intent) is True
            assert control_listener.get_intent() == intent
        assert prefect_compat.tell_engine("no-such-intent") is False
    finally:
        control_listener.clear_intent()


def test_prefects_log_and_events_workers_can_be_drained():
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        parameters = inspect.signature(service.drain_all).parameters
        assert "timeout" in parameters, service
    prefect_compat.flush(timeout=1)  # nothing queued: returns at once


def test_every_observer_logger_of_prefect_is_quieted():
    """The loggers that log the events websocket's drops: each ``get_logger("...Observer")``
    in Prefect is one the runner filters."""
    names = {
        f"prefect.{name}"
        for path in PREFECT_SOURCE.rglob("*.py")
        for name in re.findall(r'get_logger\("(\w+Observer)"\)', path.read_text(errors="replace"))
    }
    assert names, "Prefect's run observers are not where they were: see OBSERVER_LOGGERS"
    assert names <= set(prefect_compat.OBSERVER_LOGGERS), names


def test_the_engines_heartbeats_are_off_where_it_sends_them():
    from prefect import settings

    setting = getattr(settings, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
    if "heartbeat" in inspect.getsource(flow_engine):
        assert setting is not None, "the engine sends heartbeats, and its setting moved"
    with prefect_compat.engine_heartbeats_off():
        if setting is not None:
            assert setting.value() is None


def test_run_flow_and_the_step_runner_take_what_the_runner_passes():
    from prefect.deployments.steps.core import run_steps
    from prefect.flow_engine import load_flow, run_flow

    assert {"flow_run", "return_type"} <= set(inspect.signature(run_flow).parameters)
    assert list(inspect.signature(load_flow).parameters) == ["flow_run"]
    from prefect.flows import load_flow_from_entrypoint

    assert "entrypoint" in inspect.signature(load_flow_from_entrypoint).parameters
    context = {"print_function", "deployment", "flow_run", "logger"}
    assert context <= set(inspect.signature(run_steps).parameters)


def test_cancellation_hooks_run_as_the_engine_runs_them():
    calls = []

    def sync_hook(flow, flow_run, state):
        calls.append(("sync", flow.name, flow_run, state.type.value))

    async def async_hook(flow, flow_run, state):
        calls.append(("async", flow.name, flow_run, state.type.value))

    def failing_hook(flow, flow_run, state):
        raise RuntimeError("a hook's failure stops no other hook")

    @prefect.flow(on_cancellation=[failing_hook, sync_hook, async_hook])
    def cancelled_flow():
        pass

    prefect_compat.run_cancellation_hooks(cancelled_flow, "the run")

    assert calls == [
        ("sync", "cancelled-flow", "the run", "CANCELLING"),
        ("async", "cancelled-flow", "the run", "CANCELLING"),
    ]


def test_a_dropped_events_websocket_is_one_line_not_a_traceback(caplog):
    import logging

    from websockets.exceptions import ConnectionClosedError
    from websockets.frames import Close

    prefect_compat.quiet_reconnects()
    prefect_compat.quiet_reconnects()  # twice: still one filter
    logger = logging.getLogger(prefect_compat.OBSERVER_LOGGERS[0])
    assert len(logger.filters) == 1
    dropped = ConnectionClosedError(Close(1011, "server restarting"), None)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        try:
            raise dropped
        except ConnectionClosedError:
            logger.warning("websocket lost; polling", exc_info=True)
            logger.error("a real error keeps its traceback", exc_info=True)
    quieted, kept = caplog.records
    assert quieted.exc_info is None
    assert quieted.getMessage().startswith("websocket lost; polling (ConnectionClosedError: ")
    assert kept.exc_info is not None
