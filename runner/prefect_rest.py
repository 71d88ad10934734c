"""The runner's calls to the Prefect REST API, all of them: claim, read, propose and force
states, reschedule, logs, events, artifacts and the cancel poll, with one error mapping
(what a final state is, is runner/ending.py's).

Why not Prefect's client: ``import prefect`` costs over a second and tens of MB, and
the guard stays on the VM for the whole run, while a worker that execs into the flow's
environment would pay it twice (once to learn which environment, once inside it). These
calls are plain JSON, so they are made with httpx (Prefect's own HTTP library); Prefect
is imported once, in the interpreter that runs the flow.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import socket
import ssl
import uuid
from datetime import datetime, timezone
from typing import Any, Self

import httpx

from runner.ending import FINAL_STATES
from runner.errors import ApiUnreachable, CodeLoadError, ConfigError, FlowRunNotFound, NotExecuted
from runner.redaction import mask
from runner.retry import Backoff, retry
from runner.storage import redact

log = logging.getLogger("runner")

# Worth asking again: the API is up but busy, restarting, or behind a proxy that lost it.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_NOT_AGAIN = FINAL_STATES | {"RUNNING", "PAUSED", "CANCELLING"}
# Between two tries while the API does not answer: 0.5 s, doubling up to 5 s.
_BACKOFF = Backoff(first=0.5, most=5.0)
# The message of the Pending state a runner's claim sets: another runner given the same
# run (a duplicate delivery, a VM that rebooted) sees it and does not execute the run.
CLAIM_MESSAGE = "claimed by prefect-vm-runner"


def connection() -> tuple[str, dict[str, str]]:
    """The API URL and auth headers: from PREFECT_API_URL / PREFECT_API_KEY /
    PREFECT_API_AUTH_STRING when set (the usual case on a VM), else from Prefect's
    own settings (profiles, .env, prefect.toml), which means importing Prefect."""
    url, key, auth = _resolved()
    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    elif auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    return url.rstrip("/"), headers


def _api_client(*, timeout: httpx.Timeout) -> httpx.Client:
    """An HTTP client for the Prefect API (its URL and auth headers). The clients share one
    TLS context: each of its own would load the CA bundle again, 0.8 MB apiece in a guard
    that stays on the VM for the whole run (and 20 ms to set up)."""
    url, headers = connection()
    return httpx.Client(base_url=url + "/", headers=headers, timeout=timeout, verify=_tls_context())


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()  # what each client would make (SSL_CERT_FILE too)


def websocket_token() -> str | None:
    """What Prefect's websockets take in their auth message: the API key, else the
    auth string."""
    _, key, auth = _resolved()
    return key or auth


def prefect_environment() -> dict[str, str]:
    """PREFECT_API_URL / _KEY / _AUTH_STRING as variables, for a process that cannot read
    this machine's Prefect profile (a container); empty when they are variables already."""
    if os.environ.get("PREFECT_API_URL"):
        return {}
    url, key, auth = _resolved()
    values = {"PREFECT_API_URL": url, "PREFECT_API_KEY": key, "PREFECT_API_AUTH_STRING": auth}
    return {name: value for name, value in values.items() if value}


def _resolved() -> tuple[str, str | None, str | None]:
    url = os.environ.get("PREFECT_API_URL")
    key = os.environ.get("PREFECT_API_KEY")
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    if not url:
        from prefect.settings import get_current_settings

        api = get_current_settings().api
        url = str(api.url) if api.url else None
        key = api.key.get_secret_value() if api.key else None
        auth = api.auth_string.get_secret_value() if api.auth_string else None
    if not url:
        raise ConfigError(
            "PREFECT_API_URL is not set; set it (and PREFECT_API_KEY for Prefect Cloud) "
            "to the API the flow run lives in"
        )
    if not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"PREFECT_API_URL must start with http:// or https://, got {redact(url)!r}"
        )
    return url, key, auth


class ApiBusy(ApiUnreachable):
    """No answer, or an answer worth asking again for (``RETRY_STATUSES``); ``problem``
    says which, in a word."""

    def __init__(self, message: str, *, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


class PrefectRest:
    """One HTTP client for the Prefect API. ``request`` retries what is worth retrying for
    up to ``api_wait`` s and maps every failure to the runner's errors in one place: a
    refused key is a configuration error (exit 2), anything else infrastructure (exit 3)."""

    def __init__(self, *, api_wait: float = 0.0, timeout: httpx.Timeout | None = None) -> None:
        self._http = _api_client(timeout=timeout or httpx.Timeout(30.0, connect=10.0))
        self.url = redact(str(self._http.base_url).rstrip("/"))
        self._api_wait = api_wait

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        doing: str,
        *,
        retry_busy: bool = True,
        answers: tuple[int, ...] = (),
        **kwargs: Any,
    ) -> httpx.Response:
        """A 2xx response, or one whose status is in ``answers`` (a 404 the caller names);
        raises ``ApiBusy`` (retried first, with ``retry_busy``, for up to ``api_wait`` s),
        ``ConfigError`` or ``ApiUnreachable``."""

        def once() -> httpx.Response:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise ApiBusy(
                    f"Prefect API at {self.url} unreachable while {doing}: {exc}",
                    problem=type(exc).__name__,
                ) from exc
            if response.status_code in answers:
                return response
            self._check(response, doing)
            return response

        if not retry_busy:
            return once()

        def say(exc: Exception, _tries: int, _wait: float) -> None:
            problem = exc.problem if isinstance(exc, ApiBusy) else exc
            log.info("Prefect API at %s not reachable yet (%s); retrying", self.url, problem)

        try:
            return retry(
                once, on=ApiBusy, backoff=_BACKOFF, seconds=self._api_wait, before_retry=say
            )
        except ApiBusy as exc:
            raise ApiBusy(
                f"Prefect API at {self.url} unreachable for {self._api_wait:g}s "
                f"({exc.problem}); check PREFECT_API_URL and the network, or raise --api-wait",
                problem=exc.problem,
            ) from exc

    def _check(self, response: httpx.Response, doing: str) -> None:
        """The one mapping of an answer to the runner's errors."""
        code = response.status_code
        if code in (401, 403):
            raise ConfigError(
                f"Prefect API at {self.url} refused the request while {doing} (HTTP "
                f"{code}); check PREFECT_API_KEY and its access to this workspace"
            )
        if code in RETRY_STATUSES:
            raise ApiBusy(
                f"Prefect API at {self.url} failed while {doing} (HTTP {code})",
                problem=f"HTTP {code}",
            )
        if code >= 400:
            raise ApiUnreachable(
                f"Prefect API at {self.url} failed while {doing} (HTTP {code}){_detail(response)}"
            )

    def post_events(self, events: list[dict[str, Any]]) -> bool:
        """``POST /events``, once; False where the API has none (404/405: then Prefect's own
        events client must send them)."""
        response = self.request(
            "POST", "events", "sending events", json=events, retry_busy=False, answers=(404, 405)
        )
        return response.is_success

    def create_artifact(self, body: dict[str, Any]) -> None:
        """``POST /artifacts/``, once."""
        self.request("POST", "artifacts/", "writing the artifact", json=body, retry_busy=False)


def _detail(response: httpx.Response) -> str:
    """What the server said was wrong (its JSON ``detail``, cut short), for a 4xx."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return ""
    return f": {mask(str(detail))[:200]}" if detail else ""


class RunApi(PrefectRest):
    """One flow run as plain JSON: read it, claim it, reschedule it, force its final state,
    read its deployment, log to it."""

    def __init__(
        self, flow_run_id: uuid.UUID, *, api_wait: float, timeout: httpx.Timeout | None = None
    ) -> None:
        super().__init__(api_wait=api_wait, timeout=timeout)
        self.flow_run_id = flow_run_id

    def read_flow_run(self, *, retry_busy: bool = True) -> dict[str, Any]:
        """Read the run, retrying with backoff while the API does not answer (or is busy)."""
        response = self.request(
            "GET",
            f"flow_runs/{self.flow_run_id}",
            "reading the flow run",
            retry_busy=retry_busy,
            answers=(404,),
        )
        if response.status_code == 404:
            raise FlowRunNotFound(
                f"flow run {self.flow_run_id} does not exist in the Prefect API at "
                f"{self.url}; check the id and PREFECT_API_URL (workspace)"
            )
        return response.json()

    def state(self, *, retry_busy: bool = True) -> dict[str, Any]:
        """The run's state as the API has it ({} for none)."""
        return self.read_flow_run(retry_busy=retry_busy).get("state") or {}

    def claim(self) -> dict[str, Any]:
        """Make the run this runner's: propose Pending, as Prefect workers do (the server
        refuses it for a run that is already Pending, Running or final, so of two runners
        racing for a Scheduled run one wins). A run that is already Pending was handed
        over by the Prefect worker that started this process (workers propose Pending
        before they start their command): it is taken as is, unless a runner claimed it."""
        flow_run = self.read_flow_run()
        state = flow_run.get("state") or {}
        if state.get("type") == "PENDING":
            if claimed_by_a_runner(state):
                raise NotExecuted(
                    f"flow run {self.flow_run_id} is already {state['message']}; "
                    "not executing it again"
                )
            log.info(
                "flow run %s is Pending (submitted by a Prefect worker); taking it",
                self.flow_run_id,
            )
            return flow_run
        if state.get("type") in _NOT_AGAIN:
            raise NotExecuted(
                f"flow run {self.flow_run_id} is already {state.get('name') or state['type']}; "
                "not executing it again"
            )
        claim = f"{CLAIM_MESSAGE} on {socket.gethostname()} (pid {os.getpid()})"
        state = {"type": "PENDING", "name": "Pending", "message": claim}
        # Never sent twice: a claim the server took whose answer was lost would, sent
        # again, find the run claimed and not run it.
        result = self._set_state(state, force=False, doing="claiming the run", retry_busy=False)
        if result.get("status") != "ACCEPT":
            reason = (result.get("details") or {}).get("reason") or result.get("status")
            raise NotExecuted(f"flow run {self.flow_run_id} could not be claimed: {reason}")
        flow_run["state"] = result["state"]
        return flow_run

    def reschedule(self, message: str, *, run_count_at_claim: int) -> bool:
        """Propose AwaitingRetry, as Prefect's own supervisor does on SIGTERM: the run is
        Scheduled again, for another machine. True when the server accepted it; then the
        attempts this runner started go back to the run's retries (the server counts each
        entry into Running against them, and a preemption must not spend them) and
        ``message`` to its logs. The proposal comes first: it is the one request a
        preempted VM may be short of time for."""
        now = datetime.now(timezone.utc)
        state = {
            "type": "SCHEDULED",
            "name": "AwaitingRetry",
            "message": mask(message),
            "state_details": {"scheduled_time": now.isoformat()},
        }
        if self._set_state(state, force=False, doing="rescheduling the run")["status"] != "ACCEPT":
            return False
        flow_run = self.read_flow_run()
        policy = flow_run.get("empirical_policy") or {}
        spent = int(flow_run.get("run_count") or 0) - run_count_at_claim
        if spent > 0 and policy.get("retries") is not None:
            patch = {"empirical_policy": {**policy, "retries": policy["retries"] + spent}}
            self.request(
                "PATCH",
                f"flow_runs/{self.flow_run_id}",
                "giving back the run's retries",
                json=patch,
            )
        self.log([(logging.WARNING, message, now)])
        return True

    def crash(self, message: str) -> None:
        """Mark the run Crashed with ``message`` and say so in its logs. Forced: the
        worker that would have moved it on is gone, and orchestration rules must not
        keep the run Pending or Running for ever. Callers check it is not final."""
        self._force("CRASHED", "Crashed", message, "reporting the crash", logging.ERROR)

    def cancel(self, message: str) -> None:
        """Mark the run Cancelled (forced, as ``crash``) and say so in its logs."""
        self._force("CANCELLED", "Cancelled", message, "reporting the cancel", logging.INFO)

    def _force(self, type_: str, name: str, message: str, doing: str, level: int) -> None:
        state = {"type": type_, "name": name, "message": mask(message)}
        self._set_state(state, force=True, doing=doing)
        self.log([(level, message, datetime.now(timezone.utc))])

    def _set_state(
        self, state: dict[str, Any], *, force: bool, doing: str, retry_busy: bool = True
    ) -> dict[str, Any]:
        body = {"state": state, "force": force}
        path = f"flow_runs/{self.flow_run_id}/set_state"
        return self.request("POST", path, doing, json=body, retry_busy=retry_busy).json()

    def read_deployment(self, deployment_id: str) -> dict[str, Any]:
        response = self.request(
            "GET", f"deployments/{deployment_id}", "reading the deployment", answers=(404,)
        )
        if response.status_code == 404:
            raise CodeLoadError(f"deployment {deployment_id} of the flow run no longer exists")
        return response.json()

    def log(self, lines: list[tuple[int, str, datetime]]) -> None:
        """Write lines (level, message, time) to the flow run's logs in Prefect; best
        effort: a log that cannot be written never stops the run."""
        if not lines:
            return
        body = [
            {
                "name": "runner",
                "level": level,
                "message": mask(message),
                "timestamp": when.isoformat(),
                "flow_run_id": str(self.flow_run_id),
            }
            for level, message, when in lines
        ]
        try:
            self.request("POST", "logs/", "writing logs", json=body, retry_busy=False)
        except Exception as exc:
            log.warning("could not write %d log line(s) to Prefect: %s", len(lines), exc)


def claimed_by_a_runner(state: dict[str, Any]) -> bool:
    """A Pending state that a runner's claim set (not a Prefect worker's submission)."""
    return state.get("type") == "PENDING" and (state.get("message") or "").startswith(CLAIM_MESSAGE)


class RunLog:
    """The worker's lines before Prefect's logging exists: to stderr now, and to the run's
    logs in Prefect at each ``flush`` (one request per phase, not one per line)."""

    def __init__(self, api: RunApi) -> None:
        self._api = api
        self._pending: list[tuple[int, str, datetime]] = []

    def info(self, message: str, *args: object) -> None:
        self._add(logging.INFO, message % args if args else message)

    def _add(self, level: int, line: str) -> None:
        log.log(level, "%s", line)
        self._pending.append((level, line, datetime.now(timezone.utc)))

    def flush(self) -> None:
        lines, self._pending = self._pending, []
        self._api.log(lines)


def run_resources(flow_run: dict[str, Any]) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The flow run as an event resource, with its flow, deployment and tags as related
    resources: the same shape the engine gives its own heartbeats."""
    from importlib.metadata import version

    resource = {
        "prefect.resource.id": f"prefect.flow-run.{flow_run['id']}",
        "prefect.resource.name": flow_run.get("name") or "",
        "prefect.version": version("prefect"),
    }
    related = [
        {
            "prefect.resource.id": f"prefect.flow.{flow_run['flow_id']}",
            "prefect.resource.role": "flow",
        }
    ]
    if flow_run.get("deployment_id"):
        related.append(
            {
                "prefect.resource.id": f"prefect.deployment.{flow_run['deployment_id']}",
                "prefect.resource.role": "deployment",
            }
        )
    related += [
        {"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
        for tag in sorted(flow_run.get("tags") or [])
    ]
    return resource, related
