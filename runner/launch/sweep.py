"""The sweep: delete a pool's VMs that nothing will delete any more (their worker died, the
run ended long ago, or they outlived their max runtime). Runs in the worker's loop and as
``python -m runner launch sweep --pool P``."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

from runner.bootstrap_api import BootstrapApi
from runner.errors import FlowRunNotFound
from runner.launch.providers.base import TAG_FLOW_RUN, TAG_MAX_RUNTIME, Provider, Vm

log = logging.getLogger("runner")

GRACE_SECONDS = 300.0  # after its run ended, a VM's own worker deletes it first
MAX_RUNTIME_MARGIN_SECONDS = 600.0
_FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}

StateReader = Callable[[str], "str | None"]


def read_state(flow_run_id: str) -> str | None:
    """The run's state type from the Prefect API; None when the run no longer exists."""
    with BootstrapApi(uuid.UUID(flow_run_id), api_wait=10.0) as api:
        try:
            state = api.read_flow_run().get("state") or {}
        except FlowRunNotFound:
            return None
    return state.get("type") or "SCHEDULED"


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
    """Why the sweep deletes ``vm`` now, or None to keep it."""
    age = (now - vm.created).total_seconds() if vm.created else 0.0
    if vm.state == "stopped":
        return "it is powered off (a stopped VM still bills its disk)"
    max_runtime = vm.tags.get(TAG_MAX_RUNTIME)
    if max_runtime and age > float(max_runtime) + MAX_RUNTIME_MARGIN_SECONDS:
        return f"it outlived its max runtime ({max_runtime}s) by {MAX_RUNTIME_MARGIN_SECONDS:g}s"
    run_id = vm.tags.get(TAG_FLOW_RUN)
    if not run_id:
        return None  # not started by a worker; leave it to its owner
    state = state_of(run_id)
    if age <= grace:
        return None
    if state is None:
        return f"its flow run {run_id} no longer exists"
    if state in _FINAL:
        return f"its flow run {run_id} is {state.lower()}"
    return None


def sweep_command(pool: str, *, grace: float, say: Callable[[str], None]) -> int:
    """``launch sweep --pool P``: the pool's provider settings from its base job template
    (what its variables default to), then one sweep; says each VM it deleted."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from runner.errors import ConfigError
    from runner.launch.providers import provider_for

    with get_client(sync_client=True) as client:
        try:
            work_pool = client.read_work_pool(pool)
        except ObjectNotFound:
            raise ConfigError(f"work pool {pool!r} does not exist in the Prefect API") from None
    if work_pool.type != "vm":
        raise ConfigError(f"work pool {pool!r} is of type {work_pool.type!r}, not 'vm'")
    properties = work_pool.base_job_template.get("variables", {}).get("properties", {})
    defaults = {name: spec.get("default") for name, spec in properties.items()}
    provider = provider_for(
        defaults.get("provider") or "local",
        region=defaults.get("region"),
        zone=defaults.get("zone"),
    )
    deleted = sweep_pool(provider, pool, read_state, grace=grace, say=say)
    say(f"swept pool {pool}: {len(deleted)} VM(s) deleted")
    return 0
