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
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Self, TypeVar

import httpx

from runner import __version__
from runner.ending import FINAL_STATES
from runner.errors import (
    ApiUnreachable,
    CodeLoadError,
    ConfigError,
    ExitCode,
    FlowRunNotFound,
    NotExecuted,
)
from runner.redaction import mask
from runner.retry import Backoff, retry
from runner.storage import redact

log = logging.getLogger("runner")

T = TypeVar("T")

# Worth asking again: the API is up but busy, restarting, or behind a proxy that lost it.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_NOT_AGAIN = FINAL_STATES | {"RUNNING", "PAUSED", "CANCELLING"}
# Between two tries while the API does not answer: 0.5 s, doubling up to 5 s.
_BACKOFF = Backoff(first=0.5, most=5.0)
# The message of the Pending state a runner's claim sets: another runner given the same
# run (a duplicate delivery, a VM that rebooted) sees it and does not execute the run.
CLAIM_MESSAGE = "claimed by prefect-vm-runner"
# What a claim's errors say it was doing (the guard looks for it: runner/guard.py).
CLAIMING = "claiming the run"
# Tells the server's operator (its access log, a proxy) which requests are a runner's.
USER_AGENT = f"prefect-vm-runner/{__version__}"


def claim_message(pid: int) -> str:
    """The message of the Pending state that the worker ``pid`` on this machine claims with."""
    return f"{CLAIM_MESSAGE} on {socket.gethostname()} (pid {pid})"


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
    return httpx.Client(
        base_url=url + "/",
        headers={**headers, "User-Agent": USER_AGENT},
        timeout=timeout,
        verify=_tls_context(),
    )


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
    says which, in a word ("HTTP 500", "ReadTimeout"), and ``endpoint`` to what
    ("POST /flow_runs/<id>/set_state")."""

    def __init__(self, message: str, *, problem: str, endpoint: str = "") -> None:
        super().__init__(message)
        self.problem = problem
        self.endpoint = endpoint

    @property
    def outcome(self) -> str:
        """What the endpoint did, for a line: "answered HTTP 500", "got no answer (...)"."""
        if self.problem.startswith("HTTP "):
            return f"answered {self.problem}"
        return f"got no answer ({self.problem})"


class ApiLost(ApiBusy):
    """The API failed Prefect's own client, in the flow stage, past its retries: after the
    flow started the run ends ``Crashed`` (exit 5), as for any worker that dies then."""

    exit_code = ExitCode.CRASHED


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
        wait: float | None = None,
        answers: tuple[int, ...] = (),
        **kwargs: Any,
    ) -> httpx.Response:
        """A 2xx response, or one whose status is in ``answers`` (a 404 the caller names);
        raises ``ApiBusy`` (retried first, with ``retry_busy``, for up to ``wait`` s, by
        default ``api_wait``), ``ConfigError`` or ``ApiUnreachable``. Every message names
        the endpoint (``POST /flow_runs/<id>/set_state``) and what it answered."""
        endpoint = f"{method} /{path}"

        def once() -> httpx.Response:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise ApiBusy(
                    mask(
                        f"Prefect API at {self.url} unreachable while {doing}: {endpoint} "
                        f"got no answer ({type(exc).__name__}: {exc})"
                    ),
                    problem=type(exc).__name__,
                    endpoint=endpoint,
                ) from exc
            if response.status_code in answers:
                return response
            self._check(response, doing, endpoint)
            return response

        if not retry_busy:
            return once()
        return self.retrying(once, doing, wait=wait)

    def retrying(self, call: Callable[[], T], doing: str, *, wait: float | None = None) -> T:
        """``call()``, tried again on ``ApiBusy`` with backoff for up to ``wait`` s
        (``api_wait`` by default); then one ``ApiBusy`` line that names the budget, the
        endpoint and its last answer."""
        budget = self._api_wait if wait is None else max(0.0, wait)

        def say(exc: Exception, _tries: int, _wait: float) -> None:
            what = f"{exc.endpoint} {exc.outcome}" if isinstance(exc, ApiBusy) else exc
            log.info("Prefect API at %s: %s while %s; retrying", self.url, what, doing)

        try:
            return retry(call, on=ApiBusy, backoff=_BACKOFF, seconds=budget, before_retry=say)
        except ApiBusy as exc:
            raise ApiBusy(
                gave_up_line(self.url, budget, doing, exc.endpoint, exc.outcome),
                problem=exc.problem,
                endpoint=exc.endpoint,
            ) from exc

    def _check(self, response: httpx.Response, doing: str, endpoint: str) -> None:
        """The one mapping of an answer to the runner's errors."""
        code = response.status_code
        if code in (401, 403):
            raise ConfigError(
                f"Prefect API at {self.url} refused {endpoint} while {doing} (HTTP "
                f"{code}); check PREFECT_API_KEY and its access to this workspace"
            )
        if code in RETRY_STATUSES:
            raise ApiBusy(
                f"Prefect API at {self.url} failed while {doing}: {endpoint} answered HTTP {code}",
                problem=f"HTTP {code}",
                endpoint=endpoint,
            )
        if code >= 400:
            raise ApiUnreachable(
                f"Prefect API at {self.url} failed while {doing}: {endpoint} answered "
                f"HTTP {code}{_detail(response)}"
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


def gave_up_line(url: str, seconds: float, doing: str, endpoint: str, outcome: str) -> str:
    """The one line for an API that kept failing a call past its budget, masked."""
    return mask(
        f"Prefect API at {url} unreachable for {seconds:g}s while {doing}: {endpoint} "
        f"{outcome}; check PREFECT_API_URL and the network, or raise --api-wait"
    )


# Prefect's client waits 2, 4, 8... s between its tries, each cut by its jitter to as
# little as 0.82 of that (PREFECT_CLIENT_RETRY_JITTER_FACTOR's default 0.2).
_CLIENT_JITTER_FLOOR = 0.8


def prefect_client_retries(api_wait: float) -> int:
    """How many retries (``PREFECT_CLIENT_MAX_RETRIES``) make Prefect's client keep asking
    for at least ``api_wait`` s, as the runner's own calls do: 60 s takes 6 (2 + 4 + ... +
    64 s, about two minutes, never under 60 s), 3 s takes 2."""
    retries = 0
    while _CLIENT_JITTER_FLOOR * prefect_client_seconds(retries) < api_wait:
        retries += 1
    return retries


def prefect_client_seconds(retries: int) -> float:
    """About how long Prefect's client keeps asking with ``retries`` retries."""
    return float(2 ** (retries + 1) - 2)


def api_failure(
    exc: BaseException, *, doing: str, seconds: float, error: type[ApiBusy] = ApiLost
) -> ApiBusy | None:
    """The Prefect API failure behind ``exc``, an error out of Prefect's client (or what
    wraps one): a 408/429/5xx, or no answer, to a request to this Prefect API, which the
    client retried for about ``seconds``; as the runner's one line naming the endpoint,
    an ``error`` (``ApiLost`` once the flow started, ``ApiBusy`` before). None when
    ``exc`` is not that (a flow's own error, or another server's)."""
    url, _ = connection()
    api = httpx.URL(url)
    for cause in _causes(exc):
        if isinstance(cause, httpx.HTTPStatusError):
            if cause.response.status_code not in RETRY_STATUSES:
                continue
            problem = f"HTTP {cause.response.status_code}"
        elif isinstance(cause, httpx.TransportError):
            problem = type(cause).__name__
        else:
            continue
        try:
            request = cause.request
        except RuntimeError:  # an error raised without its request
            continue
        if request.url.host != api.host or request.url.port != api.port:
            continue  # not the Prefect API (a pull step's git server, a flow's own call)
        path = request.url.path
        if path.startswith(api.path.rstrip("/")):
            path = path[len(api.path.rstrip("/")) :]
        endpoint = f"{request.method} {path}"
        busy = ApiBusy("", problem=problem, endpoint=endpoint)
        line = gave_up_line(redact(url), seconds, doing, endpoint, busy.outcome)
        return error(line, problem=problem, endpoint=endpoint)
    return None


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc``, what caused it, and the members of any exception group on the way."""
    found: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or any(current is seen for seen in found):
            continue
        found.append(current)
        members = getattr(current, "exceptions", None)  # an exception group
        if isinstance(members, (list, tuple)):
            todo.extend(m for m in members if isinstance(m, BaseException))
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return found


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
        flow_run["state"] = self._propose_claim()
        return flow_run

    def _propose_claim(self) -> dict[str, Any]:
        """Propose this runner's Pending and return the state it set, within ``api_wait``.

        A 5xx or a timeout may come after the server applied the claim: sent again
        blindly, the claim would find the run claimed (by us) and not run it. So the
        claim carries a transition id, which the server keeps with the state (and a
        retried proposal with the same id is refused with the state it set:
        PreventDuplicateTransitions); after a lost answer the run is read back: Pending
        with our id (or, where a server keeps none, our message) is claimed, still
        Scheduled is claimed again, anything else was taken by someone else."""
        claim_id = str(uuid.uuid4())
        message = claim_message(os.getpid())
        state = {
            "type": "PENDING",
            "name": "Pending",
            "message": message,
            "state_details": {"transition_id": claim_id},
        }
        lost: list[ApiBusy] = []  # answers lost so far: the claim may be in
        doing = CLAIMING

        def ours(current: dict[str, Any] | None) -> bool:
            if not current or current.get("type") != "PENDING":
                return False
            kept = (current.get("state_details") or {}).get("transition_id")
            return kept == claim_id if kept else current.get("message") == message

        def once() -> dict[str, Any]:
            if lost:  # the last try may have been applied: see what the run is now
                current = self.state(retry_busy=False)
                if ours(current):
                    return current
                if current.get("type") not in (None, "SCHEDULED"):
                    raise NotExecuted(self._taken(current))
            try:
                result = self._set_state(state, force=False, doing=doing, retry_busy=False)
            except ApiBusy as exc:
                lost.append(exc)
                raise
            if result.get("status") == "ACCEPT" or ours(result.get("state")):
                return result["state"]
            if lost and ours(current := self.state(retry_busy=False)):
                return current  # a server that keeps no transition id aborts a repeat
            reason = (result.get("details") or {}).get("reason") or result.get("status")
            raise NotExecuted(f"flow run {self.flow_run_id} could not be claimed: {reason}")

        claimed = self.retrying(once, doing)
        if lost:
            log.info(
                "flow run %s claimed after %d lost answer(s) (%s %s)",
                self.flow_run_id,
                len(lost),
                lost[-1].endpoint,
                lost[-1].outcome,
            )
        return claimed

    def _taken(self, state: dict[str, Any]) -> str:
        name = state.get("name") or state.get("type")
        by = f" ({state['message']})" if claimed_by_a_runner(state) else ""
        return f"flow run {self.flow_run_id} was taken while claiming it: it is {name}{by}"

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
        if not self._propose(state, doing="rescheduling the run"):
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

    def _propose(self, state: dict[str, Any], *, doing: str) -> bool:
        """Propose ``state`` (not forced), retried within ``api_wait``; True once the server
        holds it. Its transition id makes a retry safe: a proposal the server applied but
        whose answer was lost is, sent again, refused with the state it set, ours."""
        transition_id = str(uuid.uuid4())
        details = {**(state.get("state_details") or {}), "transition_id": transition_id}
        result = self._set_state({**state, "state_details": details}, force=False, doing=doing)
        if result.get("status") == "ACCEPT":
            return True
        held = (result.get("state") or {}).get("state_details") or {}
        return held.get("transition_id") == transition_id

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
        """Write lines (level, message, time) to the flow run's logs in Prefect, retried
        within ``api_wait`` (a line written twice beats one lost: a 5xx may come after the
        server stored them); best effort: a log that cannot be written never stops the
        run."""
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
            self.request("POST", "logs/", "writing logs", json=body)
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
