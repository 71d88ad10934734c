"""The ``vm`` worker: for each flow run, start a VM from the runner's image with the run's
user-data, wait for the VM to end (the runner in it owns the run's states and powers it
off), then delete everything the VM leaves behind.

    prefect work-pool create my-vms --type vm
    prefect worker start --pool my-vms --type vm
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any, Literal, TypeVar
from uuid import UUID

import anyio
import anyio.abc
from prefect.client.schemas.objects import FlowRun
from prefect.settings import get_current_settings
from prefect.states import Crashed
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from pydantic import Field, PrivateAttr

from runner.errors import RunnerError
from runner.launch import catalog, sweep
from runner.launch.providers import CapacityError, Provider, Vm, VmRequest, provider_for
from runner.launch.providers.base import (
    TAG_CLAIM_TIMEOUT,
    TAG_FLOW_RUN,
    TAG_MAX_RUNTIME,
    TAG_POOL,
)
from runner.launch.user_data import render

SpotPolicy = Literal["on-demand", "spot", "spot_with_fallback"]
T = TypeVar("T")
POLL_SECONDS = 2.0  # how often the worker looks at a VM it waits for
CONSOLE_LINES = 20  # of the boot output, in a boot failure's message
# A run that is final while its VM still runs: the runner is powering it off. After this
# long the worker deletes it anyway.
POWEROFF_GRACE_SECONDS = 120.0
SWEEP_SECONDS = 60.0
# How long the worker keeps asking while the API or the cloud fails, before it leaves
# the VM to its runner and the sweep.
PATIENCE_SECONDS = 900.0


class _VmFields(BaseVariables):
    """What users set per pool or per deployment; Coiled's names where they mean the same."""

    provider: str = Field(
        default="local",
        title="Provider",
        description="Where VMs are started: aws, gcp, azure, or local (podman booting the "
        "VM image on the worker's machine).",
    )
    machine_image: str | None = Field(
        default=None,
        title="Machine image",
        description="The runner's VM image: an AMI id, a GCE image, an Azure image id, or for "
        "local a podman image tag (make image-test builds one).",
    )
    cpu: int | None = Field(default=None, description="Number of vCPUs the VM needs (at least).")
    memory: float | None = Field(default=None, description="GiB of memory the VM needs (at least).")
    gpu: bool = Field(default=False, description="Whether the VM needs an NVIDIA GPU.")
    arm: bool = Field(default=False, description="Whether to use an ARM (Graviton, Ampere) VM.")
    vm_types: list[str] | None = Field(
        default=None,
        title="VM types",
        description="Instance types to try, in order; default: the three cheapest of the "
        "cloud's packaged catalog that meet cpu, memory, gpu and arm.",
    )
    project: str | None = Field(
        default=None, description="The GCP project, or the Azure subscription id."
    )
    resource_group: str | None = Field(
        default=None, title="Resource group", description="The Azure resource group."
    )
    region: str | None = Field(default=None, description="The cloud region.")
    zone: str | None = Field(default=None, description="The zone (GCE; AWS subnet's zone).")
    subnet: str | None = Field(
        default=None, description="The subnet (AWS subnet id, GCE subnetwork, Azure subnet id)."
    )
    security_groups: list[str] | None = Field(
        default=None, title="Security groups", description="AWS security group ids."
    )
    identity: str | None = Field(
        default=None,
        description="What the VM runs as: an AWS instance profile (name or ARN), a GCE service "
        "account, an Azure managed identity. It gives the runner its bucket access.",
    )
    spot_policy: SpotPolicy = Field(
        default="on-demand",
        title="Spot policy",
        description="on-demand, spot, or spot_with_fallback (spot first, then on-demand).",
    )
    image: str | None = Field(
        default=None,
        description="A container image to run the flow in, inside the VM (the runner's --image).",
    )
    software: str | None = Field(
        default=None,
        title="Software environment",
        description="URL of the flow's software environment spec (the runner's --senv-url, as "
        "`python -m runner env push` prints it).",
    )
    disk_size: int | None = Field(default=None, description="Boot disk size in GiB.")
    tags: dict[str, str] = Field(
        default_factory=dict, description="More tags (labels on GCE) for the VM."
    )
    max_runtime: int | None = Field(
        default=None,
        title="Max runtime (seconds)",
        description="The runner ends the run Crashed past this (its --max-runtime); the sweep "
        "deletes a VM that outlives it by 10 minutes.",
    )
    api_key_in_ssm: bool = Field(
        default=False,
        title="API key in SSM (AWS)",
        description="Keep the Prefect API key out of the VM's user-data: the worker stores it "
        "as an SSM SecureString parameter, which the runner reads at start with the VM's "
        "role (ssm:GetParameter, kms:Decrypt), and deletes it with the VM.",
    )
    claim_timeout: int = Field(
        default=600,
        title="Claim timeout (seconds)",
        description="A VM whose runner has not claimed the run by then is deleted and the run "
        "ends Crashed with the end of its boot output.",
    )


class VmVariables(_VmFields):
    """The pool's variables (the UI's form)."""


class VmJobConfiguration(BaseJobConfiguration, _VmFields):
    """What one flow run's VM is made from: the variables, templated per run."""

    _user_env: dict[str, str | None] = PrivateAttr(default_factory=dict)

    def prepare_for_flow_run(self, flow_run: FlowRun, *args: Any, **kwargs: Any) -> None:
        # Prefect merges the worker's own settings into env; the VM gets only the user's.
        self._user_env = dict(self.env)
        super().prepare_for_flow_run(flow_run, *args, **kwargs)

    def user_env(self) -> dict[str, str | None]:
        return self._user_env


class VmWorkerResult(BaseWorkerResult):
    """identifier: the VM's id (the run's infrastructure id)."""


class VmWorker(BaseWorker[VmJobConfiguration, VmVariables, VmWorkerResult]):
    type = "vm"
    job_configuration = VmJobConfiguration
    job_configuration_variables = VmVariables
    _description = (
        "Start one VM per flow run from the prefect-vm-runner image (AWS, GCP, Azure, or "
        "podman locally); the runner in it runs the flow and powers it off, and the worker "
        "deletes whatever is left."
    )
    _display_name = "VM (prefect-vm-runner)"
    _documentation_url = "https://github.com/prefect-vm-runner/prefect-vm-runner#launching-vms"

    _last_sweep = 0.0
    _limit_is_the_pools = False  # the worker holds to the pool's limit (no --limit given)

    @classmethod
    def template_with(cls, **defaults: Any) -> dict[str, Any]:
        """The pool's base job template with these variables' defaults, for
        ``WorkPoolCreate(type="vm", base_job_template=...)``."""
        template = cls.get_default_base_job_template()
        for name, value in defaults.items():
            template["variables"]["properties"][name]["default"] = value
        return template

    async def run(
        self,
        flow_run: FlowRun,
        configuration: VmJobConfiguration,
        task_status: anyio.abc.TaskStatus[Any] | None = None,
    ) -> VmWorkerResult:
        logger = self.get_flow_run_logger(flow_run)
        try:
            provider = provider_of(configuration)
            request = self._request(flow_run, configuration)
            vm = await anyio.to_thread.run_sync(_launch, provider, request, configuration, logger)
        except RunnerError as exc:  # bad input or no capacity anywhere: one line, Crashed
            await self._crash(flow_run, f"could not start a VM: {exc}")
            if task_status is not None:
                task_status.started(exc)  # not submitted: Prefect sets no infrastructure id
            return VmWorkerResult(identifier="", status_code=0)
        logger.info("VM %s started (%s)", vm.id, _describe(vm.vm_type, vm.spot))
        if task_status is not None:
            task_status.started(vm.id)
        try:
            await self._wait_for_the_vm(flow_run, configuration, provider, vm, logger)
        except anyio.get_cancelled_exc_class():
            # The worker is stopping (a restart, a deploy): the flow goes on in its VM,
            # which powers itself off; the sweep of any worker of the pool removes it.
            logger.info("worker stopping: VM %s is left to finish its run", vm.id)
            raise
        await anyio.to_thread.run_sync(provider.delete, vm.id)
        logger.info("VM %s deleted", vm.id)
        return VmWorkerResult(identifier=vm.id, status_code=0)

    def _request(self, flow_run: FlowRun, configuration: VmJobConfiguration) -> VmRequest:
        api = get_current_settings().api
        user_data = render(
            flow_run_id=flow_run.id,
            api_url=str(api.url),
            api_key=api.key.get_secret_value() if api.key else None,
            env=configuration.user_env(),
            software=configuration.software,
            image=configuration.image,
            max_runtime=configuration.max_runtime,
        )
        tags = {
            **configuration.tags,
            TAG_POOL: self._work_pool_name,
            TAG_FLOW_RUN: str(flow_run.id),
        }
        if configuration.max_runtime:
            tags[TAG_MAX_RUNTIME] = str(configuration.max_runtime)
        tags[TAG_CLAIM_TIMEOUT] = str(configuration.claim_timeout)
        return VmRequest(
            # Unique per attempt: a rescheduled run (a preemption) gets a VM of its own.
            name=f"prefect-vm-{flow_run.id.hex[:12]}-{secrets.token_hex(3)}",
            vm_type="",
            spot=False,
            machine_image=configuration.machine_image or "",
            user_data=user_data,
            tags=tags,
            disk_size_gb=configuration.disk_size,
            cpu=configuration.cpu,
            memory_gib=configuration.memory,
            gpu=configuration.gpu,
            arm=configuration.arm,
        )

    async def _wait_for_the_vm(
        self,
        flow_run: FlowRun,
        configuration: VmJobConfiguration,
        provider: Provider,
        vm: Vm,
        logger: Any,
    ) -> None:
        """Until the VM ends: it powers itself off once the runner is done. A VM whose
        runner never claims the run, or that keeps running after the run ended, is ended
        here; a run left unfinished by a VM that ended is Crashed."""
        started = time.monotonic()
        claimed = False
        final_since: float | None = None
        while True:
            vm = await self._patiently(
                f"check on VM {vm.id}", partial(anyio.to_thread.run_sync, provider.describe, vm.id)
            )
            if vm.state in ("stopped", "gone"):
                break
            state = await self._patiently("read the flow run", partial(self._state, flow_run.id))
            claimed = claimed or await self._claimed(flow_run.id, state)
            now = time.monotonic()
            if not claimed and now - started > configuration.claim_timeout:
                console = await anyio.to_thread.run_sync(provider.console, vm.id)
                await self._crash(
                    flow_run,
                    f"VM {vm.id} did not claim the run within {configuration.claim_timeout}s; "
                    f"it was deleted. Its boot output ended with: {_tail(console)}",
                )
                return
            if state is not None and state.is_final():
                final_since = final_since or now
                if now - final_since > POWEROFF_GRACE_SECONDS:
                    logger.warning(
                        "VM %s still running %ds after the run ended; deleting it",
                        vm.id,
                        POWEROFF_GRACE_SECONDS,
                    )
                    return
            await anyio.sleep(POLL_SECONDS)
        state = await self._patiently("read the flow run", partial(self._state, flow_run.id))
        # Scheduled: a preemption rescheduled it; Cancelling: Prefect cancels it itself.
        if state is None or not (state.is_final() or state.is_scheduled() or state.is_cancelling()):
            console = await anyio.to_thread.run_sync(provider.console, vm.id)
            await self._crash(
                flow_run,
                f"VM {vm.id} stopped before the run ended; its console ended with: "
                f"{_tail(console)}",
            )

    async def _state(self, flow_run_id: UUID) -> Any:
        return (await self.client.read_flow_run(flow_run_id)).state

    async def _patiently(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, asked again at every poll while the API or the cloud fails (a
        server restart, throttling) for up to PATIENCE_SECONDS, then its error: a VM is
        never deleted, nor a run crashed, for a failure to ask about them."""
        failing_since = time.monotonic()
        while True:
            try:
                return await call()
            except Exception as exc:
                if time.monotonic() - failing_since > PATIENCE_SECONDS:
                    raise  # left to the sweep: the VM and its runner go on without us
                self._logger.warning("could not %s (will again): %s", what, exc)
                await anyio.sleep(POLL_SECONDS)

    async def _claimed(self, flow_run_id: UUID, state: Any) -> bool:
        """Whether a runner took the run: it left Pending, or a runner said it claimed it."""
        if state is not None and not state.is_pending() and not state.is_scheduled():
            return True
        body = {  # any sign of a runner at work on it: a phase, a heartbeat
            "filter": {
                "event": {"prefix": ["runner.phase.", "prefect.flow-run.heartbeat"]},
                "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
            },
            "limit": 1,
        }
        try:
            response = await self.client.request("POST", "/events/filter", json=body)
        except Exception:  # the events API is down or missing: ask again at the next poll
            return False
        return bool(response.json().get("events"))

    async def _crash(self, flow_run: FlowRun, message: str) -> None:
        self.get_flow_run_logger(flow_run).error(message)
        current = (await self.client.read_flow_run(flow_run.id)).state
        if current is None or not current.is_final():
            await self.client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)

    async def kill_infrastructure(
        self, infrastructure_pid: str, configuration: VmJobConfiguration, grace_seconds: int = 30
    ) -> None:
        """A cancel: the runner in the VM ends the run and powers off; after the grace
        period the VM is deleted whatever it does."""
        provider = provider_of(configuration)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            vm = await anyio.to_thread.run_sync(provider.describe, infrastructure_pid)
            if vm.state in ("stopped", "gone"):
                break
            await anyio.sleep(POLL_SECONDS)
        await anyio.to_thread.run_sync(provider.delete, infrastructure_pid)

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        """Prefect's poll, and every minute a sweep of the pool's orphaned VMs."""
        self._hold_to_the_pools_limit()
        if time.monotonic() - self._last_sweep > SWEEP_SECONDS:
            self._last_sweep = time.monotonic()
            try:
                configuration = await VmJobConfiguration.from_template_and_values(
                    self.work_pool.base_job_template, {}, client=self.client
                )
                provider = provider_of(configuration)
                await anyio.to_thread.run_sync(
                    partial(
                        sweep.sweep_pool,
                        provider,
                        self._work_pool_name,
                        sweep.read_state,
                        say=self._logger.info,
                    )
                )
            except Exception as exc:  # a sweep failing must never stop the worker
                self._logger.warning("sweep of pool %r failed: %s", self._work_pool_name, exc)
        return await super().get_and_submit_flow_runs()

    def _hold_to_the_pools_limit(self) -> None:
        """Without ``--limit``, the pool's concurrency limit (as it is now) is the worker's
        own: the server alone lets a few runs past it on PostgreSQL (its query for a pool's
        next runs skips rows locked by a state change, FOR UPDATE SKIP LOCKED, and gives
        their slots to later runs: 26 to 28 of 25 at once in tests/launch/test_fleet_aws.py),
        while the worker's own limit is held until it has deleted a run's VM."""
        if self._limit is not None and not self._limit_is_the_pools:
            return  # --limit given: the user's
        pool_limit = self._work_pool.concurrency_limit if self._work_pool else None
        if self._limiter is None:
            if not pool_limit:
                return
            self._limiter = anyio.CapacityLimiter(pool_limit)
            self._limit_is_the_pools = True
            self._limit = pool_limit
        elif self._limit_is_the_pools:
            self._limiter.total_tokens = pool_limit or math.inf  # changed, or lifted
            self._limit = pool_limit or None


def provider_of(configuration: VmJobConfiguration) -> Provider:
    """The configuration's provider, made from where VMs go (what each VM is, is in its
    request)."""
    return provider_for(
        configuration.provider,
        project=configuration.project,
        resource_group=configuration.resource_group,
        region=configuration.region,
        zone=configuration.zone,
        subnet=configuration.subnet,
        security_groups=configuration.security_groups,
        identity=configuration.identity,
        api_key_in_ssm=configuration.api_key_in_ssm,
    )


def _launch(
    provider: Provider, request: VmRequest, configuration: VmJobConfiguration, logger: Any
) -> Vm:
    """Create the VM from the first candidate the cloud has capacity for, logging each try."""
    candidates = [
        replace(request, vm_type=vm_type, spot=spot, user_data=_with_cost(request, price))
        for vm_type, spot, price in _candidates(configuration)
    ]
    for attempt, candidate in enumerate(candidates, start=1):
        what = _describe(candidate.vm_type, candidate.spot)
        logger.info(
            "starting VM %s (%s), try %d of %d", request.name, what, attempt, len(candidates)
        )
        try:
            return provider.create(candidate)
        except CapacityError as exc:
            logger.warning("no capacity for %s: %s", what, exc)
    tried = "; ".join(_describe(c.vm_type, c.spot) for c in candidates)
    raise CapacityError(f"no capacity for any of: {tried}")


def _candidates(configuration: VmJobConfiguration) -> list[tuple[str, bool, float | None]]:
    """(type, spot, hourly price) in the order to try: ``vm_types`` as given, else the
    cheapest types of the cloud's catalog that meet cpu, memory, gpu and arm; each type
    spot first where the policy allows, then each on demand where it allows. The price
    is the catalog's on-demand one (a spot price is not known in advance)."""
    if configuration.vm_types:
        types: list[tuple[str, float | None]] = [(t, None) for t in configuration.vm_types]
    elif (known := catalog.load(configuration.provider)) is None:
        types = [("", None)]  # a provider without types (local)
    else:
        fits = catalog.cheapest(
            known,
            cpu=configuration.cpu,
            memory=configuration.memory,
            gpu=configuration.gpu,
            arm=configuration.arm,
        )
        types = [(t.name, t.on_demand) for t in fits]
    markets = {"on-demand": [False], "spot": [True], "spot_with_fallback": [True, False]}
    return [
        (vm_type, spot, None if spot else price)
        for spot in markets[configuration.spot_policy]
        for vm_type, price in types
    ]


def _with_cost(request: VmRequest, price: float | None) -> dict[str, str]:
    """The user-data, with the type's price for the runner's cost estimate when known (a
    RUNNER_HOURLY_COST of the env job variable wins)."""
    if price is None or "RUNNER_HOURLY_COST" in request.user_data:
        return dict(request.user_data)
    return {**request.user_data, "RUNNER_HOURLY_COST": f"{price:g}"}


def _describe(vm_type: str, spot: bool) -> str:
    return f"{vm_type or 'default type'}, {'spot' if spot else 'on-demand'}"


def _tail(console: str) -> str:
    lines = [line.strip() for line in console.splitlines() if line.strip()]
    return " | ".join(lines[-CONSOLE_LINES:]) or "(no boot output)"
