"""The sweep: delete a pool's VMs that nothing will delete any more (their worker died, the
run ended long ago, or they outlived their max runtime). Runs in the worker's loop and as
``python -m runner launch sweep --pool P``."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

from runner.ending import FINAL_STATES
from runner.errors import FlowRunNotFound
from runner.launch.providers.base import (
    TAG_CLAIM_TIMEOUT,
    TAG_FLOW_RUN,
    TAG_MAX_RUNTIME,
    Provider,
    Vm,
)
from runner.prefect_rest import RunApi

log = logging.getLogger("runner")

GRACE_SECONDS = 300.0  # after its run ended, a VM's own worker deletes it first
MARGIN_SECONDS = 600.0  # past max_runtime, or claim_timeout, before the sweep steps in
_WAITING = {"SCHEDULED", "PENDING"}

# A run's state type and since when; None when the run no longer exists.
RunState = tuple[str, datetime]
StateReader = Callable[[str], "RunState | None"]


def read_state(flow_run_id: str) -> RunState | None:
    """The run's state type and its timestamp, from the Prefect API."""
    with RunApi(uuid.UUID(flow_run_id), api_wait=10.0) as api:
        try:
            state = api.state()
        except FlowRunNotFound:
            return None
    since = state.get("timestamp")
    when = datetime.fromisoformat(since.replace("Z", "+00:00")) if since else _NEVER
    return state.get("type") or "SCHEDULED", when


_NEVER = datetime.min.replace(tzinfo=timezone.utc)


def sweep_pool(
    provider: Provider,
    pool: str,
    state_of: StateReader,
    *,
    grace: float = GRACE_SECONDS,
    now: datetime | None = None,
    say: Callable[[str], None] = log.info,
) -> list[str]:
    """Delete the pool's VMs that are due (see ``why_due``), saying why; return their ids."""
    now = now or datetime.now(timezone.utc)
    deleted = []
    for vm in provider.list(pool):
        reason = why_due(vm, state_of, grace=grace, now=now)
        if reason is None:
            continue
        say(f"sweep: deleting VM {vm.id} of pool {pool}: {reason}")
        provider.delete(vm.id)
        deleted.append(vm.id)
    return deleted


def why_due(vm: Vm, state_of: StateReader, *, grace: float, now: datetime) -> str | None:
    """Why the sweep deletes ``vm`` now, or None to keep it. A VM is left to the worker
    that started it for ``grace`` (after its run ended, or after it started): that one
    deletes it first, and reads its console when it stopped too soon."""
    age = (now - vm.created).total_seconds() if vm.created else 0.0
    max_runtime = vm.tags.get(TAG_MAX_RUNTIME)
    if max_runtime and age > float(max_runtime) + MARGIN_SECONDS:
        return f"it outlived its max runtime ({max_runtime}s) by {MARGIN_SECONDS:g}s"
    run_id = vm.tags.get(TAG_FLOW_RUN)
    if not run_id:
        return None  # not started by a worker; leave it to its owner
    if vm.state != "stopped" and age <= grace:
        return None  # young, and running: no need to ask the API
    run = state_of(run_id)
    if run is None:
        return f"its flow run {run_id} no longer exists"
    state, since = run
    if state in FINAL_STATES:
        if vm.state == "stopped":
            return f"it is powered off and its flow run {run_id} is {state.lower()}"
        ended = (now - since).total_seconds()
        return (
            f"its flow run {run_id} is {state.lower()} since {ended:.0f}s"
            if ended > grace
            else None
        )
    if vm.state == "stopped" and age > grace:
        return f"it is powered off while its flow run {run_id} is {state.lower()}"
    claim_timeout = vm.tags.get(TAG_CLAIM_TIMEOUT)
    if state in _WAITING and claim_timeout and age > float(claim_timeout) + MARGIN_SECONDS:
        return f"it never claimed its flow run {run_id} (claim timeout {claim_timeout}s)"
    return None


def sweep_command(pool: str, *, grace: float, say: Callable[[str], None]) -> int:
    """``launch sweep --pool P``: the pool's provider settings from its base job template
    (what its variables default to), then one sweep; says each VM it deleted."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from runner.errors import ConfigError
    from runner.launch.worker import VmJobConfiguration, provider_of

    with get_client(sync_client=True) as client:
        try:
            work_pool = client.read_work_pool(pool)
        except ObjectNotFound:
            raise ConfigError(f"work pool {pool!r} does not exist in the Prefect API") from None
    if work_pool.type != "vm":
        raise ConfigError(f"work pool {pool!r} is of type {work_pool.type!r}, not 'vm'")
    properties = work_pool.base_job_template.get("variables", {}).get("properties", {})
    defaults = {
        name: spec["default"]
        for name, spec in properties.items()
        if spec.get("default") is not None and name in VmJobConfiguration.model_fields
    }
    configuration = VmJobConfiguration(**defaults)
    provider = provider_of(configuration)
    deleted = sweep_pool(provider, pool, read_state, grace=grace, say=say)
    say(f"swept pool {pool}: {len(deleted)} VM(s) deleted")
    return 0
