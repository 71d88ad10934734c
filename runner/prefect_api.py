"""The guard's and flow stage's Prefect calls, through Prefect's own client: read and
crash a flow run, write its logs, emit events, flush what is queued.

This facade adds the runner's rules (when a run may be marked Crashed) and
translates client errors into the runner's error tree. The worker's bootstrap,
which runs before Prefect is imported, has its own few calls in
``runner.bootstrap_api``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import LogCreate
from prefect.client.schemas.objects import FlowRun
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Crashed

from runner.bootstrap_api import connection
from runner.errors import (
    ApiUnreachable,
    ConfigError,
    FlowRunNotFound,
)
from runner.prefect_compat import OBSERVER_LOGGERS
from runner.redaction import mask
from runner.storage import redact

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import State

log = logging.getLogger("runner")


class PrefectApi:
    """What the runner asks of the Prefect API about one flow run."""

    def __init__(
        self, client: SyncPrefectClient, flow_run_id: uuid.UUID, *, url: str, api_wait: float
    ) -> None:
        self._client = client
        self._url = url
        self._api_wait = api_wait
        self.flow_run_id = flow_run_id

    @classmethod
    @contextmanager
    def connect(cls, flow_run_id: uuid.UUID, *, api_wait: float) -> Iterator[PrefectApi]:
        """A client for the run; its first read waits up to ``api_wait`` s for the API."""
        url, _ = connection()
        with get_client(sync_client=True) as client:
            yield cls(client, flow_run_id, url=redact(url), api_wait=api_wait)

    def read_flow_run(self) -> FlowRun:
        """Read the run, retrying with backoff while the API does not answer at all."""
        deadline = time.monotonic() + self._api_wait
        delay = 0.5
        while True:
            try:
                with self._http_errors("reading the flow run"):
                    return self._client.read_flow_run(self.flow_run_id)
            except ObjectNotFound:
                raise FlowRunNotFound(
                    f"flow run {self.flow_run_id} does not exist in the Prefect API at "
                    f"{self._url}; check the id and PREFECT_API_URL (workspace)"
                ) from None
            except httpx.TransportError as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ApiUnreachable(
                        f"Prefect API at {self._url} unreachable for {self._api_wait:g}s "
                        f"({type(exc).__name__}); check PREFECT_API_URL and the network, "
                        "or raise --api-wait"
                    ) from exc
                log.info(
                    "Prefect API at %s not reachable yet (%s); retrying",
                    self._url,
                    type(exc).__name__,
                )
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 5.0)

    @contextmanager
    def _http_errors(self, doing: str) -> Iterator[None]:
        """Prefect client errors as the runner's: a refused key is a configuration error,
        anything else on the way (5xx, network) is infrastructure."""
        try:
            yield
        except ObjectNotFound:
            raise
        except httpx.HTTPStatusError as exc:
            code = exc.response.status_code
            if code in (401, 403):
                raise ConfigError(
                    f"Prefect API at {self._url} refused the request while {doing} (HTTP "
                    f"{code}); check PREFECT_API_KEY and its access to this workspace"
                ) from None
            raise ApiUnreachable(
                f"Prefect API at {self._url} failed while {doing} (HTTP {code})"
            ) from None

    def crash(self, message: str) -> None:
        """Mark the run Crashed with ``message`` and say so in its logs. Forced: the
        worker that would have moved it on is gone, and orchestration rules must not
        keep the run Pending or Running for ever. Callers check it is not final."""
        self._force(Crashed(message=mask(message)), message, "the crash", level=logging.ERROR)

    def cancel(self, message: str) -> None:
        """Mark the run Cancelled (forced, as ``crash``) and say so in its logs."""
        self._force(Cancelled(message=mask(message)), message, "the cancel", level=logging.INFO)

    def _force(self, state: State, message: str, what: str, *, level: int) -> None:
        with self._http_errors(f"reporting {what}"):
            self._client.set_flow_run_state(self.flow_run_id, state, force=True)
            self.log(message, level=level)

    def log(self, message: str, *, level: int = logging.INFO) -> None:
        """Write one line to the flow run's logs in Prefect."""
        self._client.create_logs(
            [
                LogCreate(
                    name="runner",
                    level=level,
                    message=mask(message),
                    timestamp=datetime.now(timezone.utc),
                    flow_run_id=self.flow_run_id,
                )
            ]
        )


def emit(**event: Any) -> None:
    """Queue one event for Prefect's events worker (sent in the background)."""
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
    exc = record.exc_info[1] if record.exc_info else None
    if record.levelno <= logging.WARNING and isinstance(exc, (OSError, _ws_closed())):
        detail = f"{type(exc).__name__}: {exc}".replace("%", "%%")  # msg is a %-format
        record.msg = f"{record.msg} ({detail})"
        record.exc_info = record.exc_text = None
    return True


def _ws_closed() -> type[Exception]:
    from websockets.exceptions import ConnectionClosed

    return ConnectionClosed
