"""``python -m runner doctor``: whether this machine can run flow runs, one line per check;
and the zombie automation (``--install-automation``, ``--automation-json``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from runner.errors import ConfigError, ExitCode, RunnerError
from runner.prefect_rest import PrefectRest
from runner.settings import Settings
from runner.telemetry import zombies
from runner.vm.metadata import Machine, detect
from runner.vm.prices import hourly_price


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: for information, never a failure
    detail: str

    def line(self) -> str:
        mark = {True: "ok", False: "FAIL", None: "--"}[self.ok]
        return f"{mark:<5}{self.name:<12}{self.detail}"


def automation_json(settings: Settings, missed: int) -> str:
    return json.dumps(_automation(settings, missed), indent=2)


def run(
    settings: Settings, *, install_automation: bool, missed: int, say: Callable[[str], None]
) -> int:
    """Print each check; install the automation if asked; exit 0, or 2 when a check failed."""
    wanted = _automation(settings, missed) if install_automation else None  # bad flags first
    rest: PrefectRest | None = None
    try:
        rest = PrefectRest(timeout=httpx.Timeout(10.0, connect=5.0))
        api = _prefect_api(rest)
    except RunnerError as exc:
        api = Check("prefect-api", False, str(exc))
    try:
        machine = detect(cloud=settings.cloud, urls=settings.metadata_urls())
        checks = [api, _workdir(settings), _uv(), _containers(), _machine(machine)]
        if settings.price_table or settings.hourly_cost is not None:
            checks.append(_price(settings, machine))
        if rest is not None and api.ok:
            checks.append(_install(rest, wanted) if wanted else _automation_present(rest))
        elif wanted:
            checks.append(Check("automation", False, "not installed: no Prefect API"))
    finally:
        if rest is not None:
            rest.close()
    for check in checks:
        say(check.line())
    failed = any(check.ok is False for check in checks)
    return int(ExitCode.CONFIG_ERROR if failed else ExitCode.COMPLETED)


def _automation(settings: Settings, missed: int) -> dict[str, Any]:
    if settings.heartbeat_seconds <= 0:
        raise ConfigError(
            "the zombie automation needs heartbeats, but --heartbeat-seconds is 0; give the "
            "interval your runners use"
        )
    if missed < 1:
        raise ConfigError(f"--missed-heartbeats must be at least 1, got {missed}")
    return zombies.automation(heartbeat_seconds=settings.heartbeat_seconds, missed=missed)


def _prefect_api(rest: PrefectRest) -> Check:
    try:
        rest.request("GET", "health", "checking its health", retry_busy=False)
    except RunnerError as exc:
        return Check("prefect-api", False, str(exc))
    try:  # for information: not every API says its version
        version = rest.request("GET", "admin/version", "reading its version", retry_busy=False)
        server = f" (server {version.json()})"
    except (RunnerError, ValueError):
        server = ""
    return Check("prefect-api", True, f"{rest.url}{server}")


def _workdir(settings: Settings) -> Check:
    try:
        settings.workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=settings.workdir):
            pass
    except OSError as exc:
        return Check("workdir", False, f"{settings.workdir} is not writable: {exc.strerror}")
    free = shutil.disk_usage(settings.workdir).free
    return Check("workdir", True, f"{settings.workdir} ({free / 1024**3:.1f} GiB free)")


def _uv() -> Check:
    try:
        from uv import find_uv_bin

        done = subprocess.run(
            [find_uv_bin(), "--version"], capture_output=True, text=True, timeout=30
        )
    except (ImportError, OSError, subprocess.SubprocessError) as exc:
        return Check("uv", False, f"not usable ({exc}); environments cannot be built")
    return Check("uv", done.returncode == 0, done.stdout.strip() or done.stderr.strip())


def _containers() -> Check:
    for name in ("podman", "docker"):
        if found := shutil.which(name):
            return Check("containers", True, f"{name} at {found} (for --image)")
    return Check("containers", None, "no podman or docker: runs with --image cannot start here")


def _machine(machine: Machine) -> Check:
    if machine.cloud == "unknown":
        return Check("machine", None, f"{machine.instance_id}: no cloud instance metadata")
    spot = {True: ", spot", False: "", None: ", spot unknown"}[machine.spot]
    return Check(
        "machine",
        True,
        f"{machine.cloud} {machine.region} {machine.instance_type} {machine.instance_id}{spot}",
    )


def _install(rest: PrefectRest, wanted: dict[str, Any]) -> Check:
    try:
        automation_id, created = zombies.install(rest, wanted)
    except RunnerError as exc:
        return Check("automation", False, f"not installed: {exc}")
    verb = "installed" if created else "updated"
    within = wanted["trigger"]["within"]
    return Check("automation", True, f"{verb} {automation_id}: Crashed after {within}s of silence")


def _price(settings: Settings, machine: Machine) -> Check:
    try:
        price = hourly_price(
            hourly_cost=settings.hourly_cost, table_path=settings.price_table, machine=machine
        )
    except ConfigError as exc:
        return Check("price", False, str(exc))
    if price is None:
        return Check("price", None, f"no price for instance type {machine.instance_type}")
    return Check("price", True, f"${price.hourly:g}/h ({price.basis})")


def _automation_present(rest: PrefectRest) -> Check:
    try:
        present = zombies.installed(rest)
    except RunnerError as exc:
        return Check("automation", None, f"could not list automations: {exc}")
    if present:
        within = present[0].get("trigger", {}).get("within")
        return Check("automation", True, f"zombie automation {present[0]['id']} (within {within}s)")
    return Check(
        "automation",
        None,
        "no zombie automation: runs whose VM dies stay Running; add it with "
        "`python -m runner doctor --install-automation`",
    )
