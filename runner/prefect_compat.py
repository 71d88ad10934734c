"""Every use of a Prefect internal, in one place: each is found by feature (what the
installed Prefect has), never by its version number, and has a fallback where it is
missing, so that the runner works on every Prefect of the supported range (pyproject's).
tests/unit/test_prefect_compat.py fails loudly when a release changes one of them."""

from __future__ import annotations

import contextlib
import inspect
import logging
import typing
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("runner")

# The loggers of Prefect's run observers, which log a traceback each time the API drops
# their events websocket (prefect._internal.observers; prefect.runner._observers before).
OBSERVER_LOGGERS = ("prefect.FlowRunSuspendingObserver", "prefect.FlowRunCancellingObserver")


def engine_intents() -> frozenset[str]:
    """The intents Prefect's flow engine acts on when a SIGTERM stops it: what Prefect's
    own supervisor tells it over its control channel first. "cancel" (run the flow's
    on_cancellation hooks, end Cancelled) from 3.6.27; "relinquish" (stop without a state:
    the supervisor proposes the next one) from 3.8.1; none before (a SIGTERM crashes the
    run)."""
    try:
        from prefect._internal import control_listener
    except ImportError:
        return frozenset()
    if not callable(getattr(control_listener, "_set_intent", None)):
        return frozenset()
    return frozenset(str(intent) for intent in typing.get_args(control_listener.Intent))


def tell_engine(intent: str) -> bool:
    """Tell the engine what the SIGTERM that follows means; False where it would not
    understand (the caller then stops the flow another way)."""
    if intent not in engine_intents():
        return False
    from prefect._internal import control_listener

    control_listener._set_intent(intent)  # type: ignore[arg-type]
    return True


def run_cancellation_hooks(flow: Any, flow_run: Any) -> None:
    """The flow's on_cancellation hooks, as Prefect's engine runs them on a cancel, for a
    Prefect whose engine cannot be told that a SIGTERM is a cancel. Each hook's failure is
    logged, as Prefect does, and never stops the others."""
    from prefect.states import Cancelling

    state = Cancelling()
    for hook in getattr(flow, "on_cancellation_hooks", None) or []:
        name = getattr(hook, "__name__", repr(hook))
        try:
            result = hook(flow, flow_run, state)
            if inspect.isawaitable(result):
                from prefect.utilities.asyncutils import run_coro_as_sync

                run_coro_as_sync(result)
            log.info("on_cancellation hook %r finished", name)
        except Exception:
            log.exception("on_cancellation hook %r failed", name)


def flush(timeout: float = 30.0) -> None:
    """Send the logs and events still queued in this process (Prefect's log and events
    workers), before it exits or tears down. Best effort: never masks the run's outcome."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=timeout)
        except Exception:
            log.debug("flush of %s failed", service.__name__, exc_info=True)


@contextlib.contextmanager
def engine_heartbeats_off() -> Iterator[None]:
    """No flow-run heartbeats from the engine (the guard sends them: two would double
    them, and the engine waits up to a second for its own to stop at the end). A Prefect
    whose engine sends none has no such setting."""
    from prefect import settings

    setting = getattr(settings, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
    if setting is None:
        yield
        return
    with settings.temporary_settings(updates={setting: None}):
        yield


def load_flow(flow_run: Any) -> Any:
    """The flow of a deployment's run through Prefect's own loader (the deployment's
    storage, path and pull steps)."""
    from prefect.flow_engine import load_flow as engine_load_flow

    return engine_load_flow(flow_run)


def load_flow_from_entrypoint(entrypoint: str) -> Any:
    """The flow at ``entrypoint`` ("path.py:name" or "module.name"), imported for real:
    never the placeholder a Prefect that can make one would give for an import error."""
    from prefect.flows import load_flow_from_entrypoint as load

    if "use_placeholder_flow" in inspect.signature(load).parameters:
        return load(entrypoint, use_placeholder_flow=False)
    return load(entrypoint)


def run_flow(flow: Any, flow_run: Any, *, error_logger: logging.Logger) -> Any:
    """Prefect's ``run_flow`` for a flow run that exists already, returning its state;
    ``error_logger`` (where a crash's traceback goes) only where it takes one."""
    from prefect.flow_engine import run_flow as engine_run_flow

    options: dict[str, Any] = {"flow_run": flow_run, "return_type": "state"}
    if "error_logger" in inspect.signature(engine_run_flow).parameters:
        options["error_logger"] = error_logger
    return engine_run_flow(flow, **options)


def run_steps(steps: list[dict[str, Any]], **context: Any) -> dict[str, Any]:
    """A deployment's pull steps through Prefect's step runner, given only the context
    (deployment, flow_run, logger, print_function) this Prefect's runner takes."""
    from prefect.deployments.steps.core import run_steps as run_deployment_steps
    from prefect.utilities.asyncutils import run_coro_as_sync

    accepted = inspect.signature(run_deployment_steps).parameters
    given = {name: value for name, value in context.items() if name in accepted}
    return run_coro_as_sync(run_deployment_steps(steps, **given)) or {}


def emit(**event: Any) -> None:
    """Queue one event for Prefect's events worker (sent in the background): the events
    sender's way out where the API has no ``POST /events``."""
    from prefect.events import emit_event

    emit_event(**event)


def quiet_reconnects() -> None:
    """Keep the one line, not the traceback, that Prefect logs when the API drops its
    events websocket (a restart, a network blip): the observer falls back to polling and
    reconnects by itself, and a journal full of tracebacks hides the errors that matter."""
    for name in OBSERVER_LOGGERS:
        logger = logging.getLogger(name)
        if _dropped_socket_line not in logger.filters:
            logger.addFilter(_dropped_socket_line)


def _dropped_socket_line(record: logging.LogRecord) -> bool:
    from websockets.exceptions import ConnectionClosed

    exc = record.exc_info[1] if record.exc_info else None
    if record.levelno <= logging.WARNING and isinstance(exc, (OSError, ConnectionClosed)):
        detail = f"{type(exc).__name__}: {exc}".replace("%", "%%")  # msg is a %-format
        record.msg = f"{record.msg} ({detail})"
        record.exc_info = record.exc_text = None
    return True
