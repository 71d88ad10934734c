"""The one module that talks to the Prefect API: read, claim, crash, and log for a flow run.

Prefect's own client does the HTTP; this facade adds the runner's rules (what
counts as a claim, when a run may be marked Crashed) and translates client
errors into the runner's error tree.
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
import prefect
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import LogCreate
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import DeploymentResponse, SetStateStatus
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from prefect.states import Crashed, Pending

from runner.errors import (
    ApiUnreachable,
    CodeLoadError,
    ConfigError,
    FlowRunNotFound,
    NotExecuted,
)
from runner.storage import redact

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

log = logging.getLogger("runner")


def api_url() -> str:
    """The Prefect API URL from Prefect's settings; without one Prefect would start a
    throwaway in-process server, which is never what a VM agent wants."""
    url = get_current_settings().api.url
    if not url:
        raise ConfigError(
            "PREFECT_API_URL is not set; set it (and PREFECT_API_KEY for Prefect Cloud) "
            "to the API the flow run lives in"
        )
    return str(url)


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
        url = api_url()
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

    def claim(self) -> FlowRun:
        """Make the run this runner's: propose Pending, as Prefect workers do (the server
        refuses it for a run that is already Pending, Running or final). A run that is
        already Pending was handed over by the Prefect worker that started this process
        (workers propose Pending before they start their command): it is taken as is."""
        flow_run = self.read_flow_run()
        state = flow_run.state
        if state is not None and state.is_pending():
            log.info(
                "flow run %s is Pending (submitted by a Prefect worker); taking it",
                self.flow_run_id,
            )
            return flow_run
        if state is not None and (
            state.is_final() or state.is_running() or state.is_paused() or state.is_cancelling()
        ):
            raise NotExecuted(
                f"flow run {self.flow_run_id} is already {state.name}; not executing it again"
            )
        try:
            with self._http_errors("claiming the run"):
                result = self._client.set_flow_run_state(self.flow_run_id, Pending())
        except httpx.TransportError as exc:
            raise ApiUnreachable(f"Prefect API unreachable while claiming the run: {exc}") from exc
        if result.status != SetStateStatus.ACCEPT:
            reason = getattr(result.details, "reason", None) or result.status.value
            raise NotExecuted(f"flow run {self.flow_run_id} could not be claimed: {reason}")
        flow_run.state = result.state
        return flow_run

    def read_deployment(self, deployment_id: uuid.UUID) -> DeploymentResponse:
        try:
            with self._http_errors("reading the deployment"):
                return self._client.read_deployment(deployment_id)
        except ObjectNotFound:
            raise CodeLoadError(
                f"deployment {deployment_id} of the flow run no longer exists"
            ) from None
        except httpx.TransportError as exc:
            raise ApiUnreachable(
                f"Prefect API unreachable while reading the deployment: {exc}"
            ) from exc

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
        with self._http_errors("reporting the crash"):
            self._client.set_flow_run_state(self.flow_run_id, Crashed(message=message), force=True)
            self.log(message, level=logging.ERROR)

    def log(self, message: str, *, level: int = logging.INFO) -> None:
        """Write one line to the flow run's logs in Prefect."""
        self._client.create_logs(
            [
                LogCreate(
                    name="runner",
                    level=level,
                    message=message,
                    timestamp=datetime.now(timezone.utc),
                    flow_run_id=self.flow_run_id,
                )
            ]
        )


def flow_run_resources(flow_run: FlowRun) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The flow run as an event resource, with its flow, deployment and tags as related
    resources: the same shape the engine gives its own heartbeats."""
    resource = {
        "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
        "prefect.resource.name": flow_run.name or "",
        "prefect.version": prefect.__version__,
    }
    related = [
        {"prefect.resource.id": f"prefect.flow.{flow_run.flow_id}", "prefect.resource.role": "flow"}
    ]
    if flow_run.deployment_id:
        related.append(
            {
                "prefect.resource.id": f"prefect.deployment.{flow_run.deployment_id}",
                "prefect.resource.role": "deployment",
            }
        )
    related += [
        {"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
        for tag in sorted(flow_run.tags or [])
    ]
    return resource, related


def emit(**event: Any) -> None:
    """Queue one event for Prefect's events worker (sent in the background)."""
    emit_event(**event)


def flush_prefect(timeout: float = 30.0) -> None:
    """Send the logs and events still queued in this process, before it exits or tears down."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=timeout)
        except Exception:  # flushing is best effort; never mask the run's outcome
            log.debug("flush of %s failed", service.__name__, exc_info=True)
