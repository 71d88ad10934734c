"""What a launched VM is told: the runner's ``KEY=VALUE`` user-data for one flow run."""

from __future__ import annotations

import json
from collections.abc import Mapping
from uuid import UUID

# Where the image's unit reads it (images/systemd/prefect-vm-runner.service).
USER_DATA_FILE = "/etc/prefect-vm-runner/user-data.env"


def render(
    *,
    flow_run_id: UUID,
    api_url: str,
    api_key: str | None,
    env: Mapping[str, str | None],
    software: str | None = None,
    image: str | None = None,
    max_runtime: int | None = None,
) -> dict[str, str]:
    """The runner's settings for the VM (images/README.md, "User data"): the run, the API
    and its key, the run's env and container, its max runtime; then the ``env`` job
    variable, which wins. Nothing else of the worker's own environment goes along (its
    PREFECT_HOME, its log settings): the VM has its own."""
    data = {"RUNNER_FLOW_RUN_ID": str(flow_run_id), "PREFECT_API_URL": api_url}
    if api_key:
        data["PREFECT_API_KEY"] = api_key
    if software:
        data["RUNNER_SENV_URL"] = software
    if image:
        data["RUNNER_IMAGE"] = image
    if max_runtime:
        data["RUNNER_MAX_RUNTIME"] = str(max_runtime)
    data.update({key: value for key, value in env.items() if value is not None})
    return data


def as_env_file(data: Mapping[str, str]) -> str:
    """The systemd EnvironmentFile text of ``data``, each value quoted so that spaces,
    quotes and ``#`` survive (the runner reads it with python-dotenv)."""
    lines = []
    for key, value in data.items():
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        lines.append(f'{key}="{escaped}"\n')
    return "".join(lines)


def cloud_config(data: Mapping[str, str]) -> str:
    """EC2 user-data and Azure custom data: a cloud-init ``#cloud-config`` whose
    ``write_files`` puts the env file where the unit reads it, 0600 (it holds the API
    key). Written as JSON, which YAML reads as it is, so no value needs YAML quoting."""
    document = {
        "write_files": [
            {
                "path": USER_DATA_FILE,
                "owner": "root:root",
                "permissions": "0600",
                "content": as_env_file(data),
            }
        ]
    }
    return "#cloud-config\n" + json.dumps(document, indent=1) + "\n"
