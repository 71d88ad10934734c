"""The Prefect automation that marks a flow run Crashed when its VM goes silent: the
guard's heartbeats stop without the ``runner.phase.teardown`` that ends a clean exit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.prefect_rest import PrefectRest

NAME = "prefect-vm-runner: crash flow runs whose VM went silent"
MISSED_HEARTBEATS = 3
# Prefect refuses proactive triggers with a shorter window.
MIN_WITHIN_SECONDS = 10


def automation(*, heartbeat_seconds: float, missed: int = MISSED_HEARTBEATS) -> dict[str, Any]:
    """The automation as Prefect's API (and ``prefect automation create``) takes it.

    After each heartbeat, Prefect expects another event of the run within ``missed``
    heartbeats: a heartbeat, a metrics or phase event, a state change. A clean exit ends
    with ``runner.phase.teardown`` after the last heartbeat, so only a death trips it."""
    within = max(MIN_WITHIN_SECONDS, round(heartbeat_seconds * missed))
    return {
        "name": NAME,
        "description": (
            f"Marks a flow run Crashed when no event of it arrived for {within}s after a "
            "heartbeat: the VM (or the runner on it) died without tearing down. Installed by "
            "`python -m runner doctor --install-automation`."
        ),
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "after": ["prefect.flow-run.heartbeat"],
            "expect": ["prefect.flow-run.*", "runner.*"],
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": within,
        },
        "actions": [
            {
                "type": "change-flow-run-state",
                "state": "CRASHED",
                "message": (
                    f"No heartbeat for {within}s: the VM running this flow run stopped "
                    "without tearing down (prefect-vm-runner zombie automation)."
                ),
            }
        ],
    }


def installed(api: PrefectRest) -> list[dict[str, Any]]:
    """Automations of this name in the workspace."""
    response = api.request(
        "POST", "automations/filter", "listing automations", json={"limit": 200}, retry_busy=False
    )
    return [found for found in response.json() if found.get("name") == NAME]


def install(api: PrefectRest, wanted: dict[str, Any]) -> tuple[str, bool]:
    """Create the automation, or update the one already there; (id, created)."""
    present = installed(api)
    doing = "installing the zombie automation"
    if present:
        automation_id = present[0]["id"]
        api.request("PUT", f"automations/{automation_id}", doing, json=wanted, retry_busy=False)
        return automation_id, False
    response = api.request("POST", "automations/", doing, json=wanted, retry_busy=False)
    return response.json()["id"], True
