"""The Prefect REST calls the worker makes before Prefect is imported: read, claim, log.

Why not Prefect's client here: ``import prefect`` costs over a second, and a
worker that execs into the flow's environment would pay it twice (once to
learn which environment, once inside it). These few calls are plain JSON, so
the worker makes them with httpx (Prefect's own HTTP library) and imports
Prefect once, in the interpreter that runs the flow. The rules (what counts as
a claim; how errors map to exit codes) match ``runner.prefect_api``.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import socket
import ssl
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import httpx

from runner.errors import ApiUnreachable, CodeLoadError, ConfigError, FlowRunNotFound, NotExecuted
from runner.redaction import mask
from runner.storage import redact

log = logging.getLogger("runner")

# Prefect's client retries these statuses too: the API is up but busy or restarting.
_RETRY_STATUSES = {429, 502, 503, 504}
_FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
_NOT_AGAIN = _FINAL | {"RUNNING", "PAUSED", "CANCELLING"}
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


def api_client(*, timeout: httpx.Timeout) -> httpx.Client:
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


class BootstrapApi:
    """The flow run as plain JSON: read it, claim it, read its deployment, log to it."""

    def __init__(self, flow_run_id: uuid.UUID, *, api_wait: float) -> None:
        self.flow_run_id = flow_run_id
        self._http = api_client(timeout=httpx.Timeout(30.0, connect=10.0))
        self._url = redact(str(self._http.base_url).rstrip("/"))
        self._api_wait = api_wait

    def __enter__(self) -> BootstrapApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def read_flow_run(self) -> dict[str, Any]:
        """Read the run, retrying with backoff while the API does not answer (or is busy)."""
        response = self._request("GET", f"flow_runs/{self.flow_run_id}", "reading the flow run")
        if response.status_code == 404:
            raise FlowRunNotFound(
                f"flow run {self.flow_run_id} does not exist in the Prefect API at "
                f"{self._url}; check the id and PREFECT_API_URL (workspace)"
            )
        self._check(response, "reading the flow run")
        return response.json()

    def claim(self) -> dict[str, Any]:
        """Make the run this runner's: propose Pending, as Prefect workers do (the server
        refuses it for a run that is already Pending, Running or final, so of two runners
        racing for a Scheduled run one wins). A run that is already Pending was handed
        over by the Prefect worker that started this process (workers propose Pending
        before they start their command): it is taken as is, unless a runner claimed it."""
        flow_run = self.read_flow_run()
        state = flow_run.get("state") or {}
        if state.get("type") == "PENDING":
            if (state.get("message") or "").startswith(CLAIM_MESSAGE):
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
        body = {"state": {"type": "PENDING", "name": "Pending", "message": claim}, "force": False}
        response = self._request(
            "POST",
            f"flow_runs/{self.flow_run_id}/set_state",
            "claiming the run",
            json=body,
            retry=False,
        )
        self._check(response, "claiming the run")
        result = response.json()
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
        state = {"type": "SCHEDULED", "name": "AwaitingRetry", "message": mask(message)}
        body = {
            "state": {**state, "state_details": {"scheduled_time": now.isoformat()}},
            "force": False,
        }
        path = f"flow_runs/{self.flow_run_id}"
        response = self._request("POST", f"{path}/set_state", "rescheduling", json=body)
        self._check(response, "rescheduling the run")
        if response.json().get("status") != "ACCEPT":
            return False
        flow_run = self.read_flow_run()
        policy = flow_run.get("empirical_policy") or {}
        spent = int(flow_run.get("run_count") or 0) - run_count_at_claim
        if spent > 0 and policy.get("retries") is not None:
            patch = {"empirical_policy": {**policy, "retries": policy["retries"] + spent}}
            response = self._request("PATCH", path, "giving back retries", json=patch)
            self._check(response, "giving back the run's retries")
        self.log([(logging.WARNING, message, now)])
        return True

    def read_deployment(self, deployment_id: str) -> dict[str, Any]:
        response = self._request("GET", f"deployments/{deployment_id}", "reading the deployment")
        if response.status_code == 404:
            raise CodeLoadError(f"deployment {deployment_id} of the flow run no longer exists")
        self._check(response, "reading the deployment")
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
            self._check(self._http.post("logs/", json=body), "writing logs")
        except Exception as exc:
            log.warning("could not write %d log line(s) to Prefect: %s", len(lines), exc)

    def _request(
        self, method: str, path: str, doing: str, *, retry: bool = True, **kwargs: Any
    ) -> httpx.Response:
        deadline = time.monotonic() + self._api_wait
        delay = 0.5
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
                if not (retry and response.status_code in _RETRY_STATUSES):
                    return response
                problem = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                if not retry:
                    raise ApiUnreachable(
                        f"Prefect API at {self._url} unreachable while {doing}: {exc}"
                    ) from exc
                problem = type(exc).__name__
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ApiUnreachable(
                    f"Prefect API at {self._url} unreachable for {self._api_wait:g}s "
                    f"({problem}); check PREFECT_API_URL and the network, or raise --api-wait"
                )
            log.info("Prefect API at %s not reachable yet (%s); retrying", self._url, problem)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)

    def _check(self, response: httpx.Response, doing: str) -> None:
        """A refused key is a configuration error; anything else (5xx) is infrastructure."""
        code = response.status_code
        if code in (401, 403):
            raise ConfigError(
                f"Prefect API at {self._url} refused the request while {doing} (HTTP "
                f"{code}); check PREFECT_API_KEY and its access to this workspace"
            )
        if code >= 400:
            raise ApiUnreachable(f"Prefect API at {self._url} failed while {doing} (HTTP {code})")


class RunLog:
    """The worker's lines before Prefect's logging exists: to stderr now, and to the run's
    logs in Prefect at each ``flush`` (one request per phase, not one per line)."""

    def __init__(self, api: BootstrapApi) -> None:
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
