"""The runner's settings: one frozen model, read once from CLI flags and ``RUNNER_*`` variables."""

from __future__ import annotations

import shlex
import tempfile
import uuid
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from runner.errors import ConfigError
from runner.vm import clouds  # the registry only: it imports each cloud on first use

# What --cloud accepts: each cloud's name in the registry, between 'auto' and 'none'.
_CLOUD_CHOICES = ("auto", *clouds.CLOUDS, "none")


class Settings(BaseSettings):
    """Everything a run is configured by. Precedence: CLI flag > ``RUNNER_<FLAG>`` variable.

    Prefect's own settings (``PREFECT_API_URL``, ``PREFECT_API_KEY``, ...) are
    read by Prefect from the environment as usual and are not repeated here.
    """

    model_config = SettingsConfigDict(
        env_prefix="RUNNER_", frozen=True, extra="forbid", populate_by_name=True
    )

    flow_run_id: str | None = Field(
        default=None,
        # No plain "flow_run_id" alias: env matching would then read FLOW_RUN_ID too.
        # populate_by_name keeps Settings(flow_run_id=...) working.
        validation_alias=AliasChoices("RUNNER_FLOW_RUN_ID", "PREFECT__FLOW_RUN_ID"),
        description="The flow run to execute (a UUID). Also read from PREFECT__FLOW_RUN_ID, "
        "which Prefect workers set.",
    )
    workdir: Path = Field(
        default=Path(tempfile.gettempdir()) / "prefect-vm-runner",
        description="Directory the runner owns: each run gets <workdir>/runs/<flow-run-id>, "
        "where the flow's code is placed and the flow runs.",
    )
    code_url: str | None = Field(
        default=None,
        description="URL of the flow's code bundle (s3://, gs://, az://, abfs[s]://, https://, "
        "file:// or a path): .../<sha256>.tar.gz or any URL with #sha256=<hex>. Default: the "
        "flow run's code_url job variable, else the deployment's runner.steps.pull_bundle step.",
    )
    senv_url: str | None = Field(
        default=None,
        description="URL of the flow's software environment spec, as `env push` prints it "
        "(.../<sha256>.json or #sha256=<hex>). Default: the flow run's senv (or software) job "
        "variable, else a lock file in the code bundle (pylock.toml, uv.lock, senv.json, "
        "requirements.txt); none: the runner's own environment.",
    )
    image: str | None = Field(
        default=None,
        description="Container image to run the flow in (podman or docker), instead of an env "
        "on the host; it must have prefect-vm-runner installed. Default: the flow run's image "
        "job variable.",
    )
    container_run_args: str | None = Field(
        default=None,
        description="Extra flags for `podman run`/`docker run` with --image, shell-quoted "
        "(e.g. '--runtime runc --gpus all').",
    )
    index_url: str | None = Field(
        default=None,
        description="Package index for environment installs (uv's --index-url); may hold "
        "credentials, which are never logged. Default: uv's (PyPI, or UV_INDEX_URL).",
    )
    extra_index_url: str | None = Field(
        default=None,
        description="More package indexes for environment installs, space-separated.",
    )
    env_cache_bytes: int = Field(
        default=20 * 1024**3,
        gt=0,
        description="Size past which the least recently used environments in "
        "<workdir>/cache/envs are removed (never one in use).",
    )
    max_bundle_bytes: int = Field(
        default=4 * 1024**3,
        gt=0,
        description="Largest expanded size a code bundle may have, in bytes (zip-bomb guard).",
    )
    max_bundle_files: int = Field(
        default=200_000, gt=0, description="Most members a code bundle may have."
    )
    on_exit: Literal["none", "poweroff", "command"] = Field(
        default="none",
        description="What to do once the run is over, whatever its outcome (exactly once, "
        "after logs and events are flushed and the summary is written): 'none'; 'poweroff' "
        "the machine (systemctl poweroff, else shutdown -h now; what the VM images use); or "
        "'command' to run --on-exit-command.",
    )
    on_exit_command: str | None = Field(
        default=None,
        description="Shell command for --on-exit command. It sees RUNNER_EXIT_CODE and "
        "RUNNER_FLOW_RUN_ID in its environment.",
    )
    on_exit_timeout: float = Field(
        default=120.0, gt=0, description="Seconds the exit command may run before it is killed."
    )
    keep_workdir: bool = Field(
        default=False,
        description="Keep the run's directory (<workdir>/runs/<flow-run-id>: its code and "
        "stage file) and the runner's log file (<workdir>/logs) after the run; by default "
        "they are removed before the teardown. The caches under <workdir>/cache always stay.",
    )
    log_url: str | None = Field(
        default=None,
        description="Bucket URL (s3://, gs://, az://, file://...) to upload the runner's own "
        "log to at the end, as <log-url>/<flow-run-id>/<host>-<pid>.log; unset: the log goes "
        "to stderr (the journal) only.",
    )
    user_data_file: Path | None = Field(
        default=None,
        description="KEY=VALUE file written from the VM's user-data (RUNNER_* and PREFECT_* "
        "variables), read below the environment; when no flow run id is known yet the runner "
        "waits up to --claim-timeout for the file to name one.",
    )
    prefect_api_key_ssm: str | None = Field(
        default=None,
        description="Name of an AWS SSM SecureString parameter that holds PREFECT_API_KEY, "
        "read at start with the machine's role when PREFECT_API_KEY is not set, then deleted "
        "where the role may (the vm worker's api_key_in_ssm: the key stays out of the VM's "
        "user-data).",
    )
    claim_timeout: float = Field(
        default=600.0,
        ge=0,
        description="Seconds to wait for a flow run id to arrive in --user-data-file before "
        "giving up (exit code 2) and tearing down.",
    )
    max_runtime: float | None = Field(
        default=None,
        gt=0,
        description="Seconds from the runner's start after which the worker is stopped and "
        "the run ends Crashed ('exceeded max runtime'); unset: no limit.",
    )
    on_preemption: Literal["reschedule", "crash"] = Field(
        default="reschedule",
        description="What a preemption does to the run (SIGTERM to the runner, as cloud "
        "shutdowns and `docker stop` send, or a spot notice from the instance metadata): "
        "'reschedule' stops the flow and proposes AwaitingRetry, so the run is Scheduled "
        "again for another machine without spending the flow's own retries; 'crash' ends "
        "it Crashed.",
    )
    spot_poll_seconds: float = Field(
        default=5.0,
        ge=0,
        description="Seconds between polls of the cloud's instance metadata for a spot "
        "preemption notice (AWS spot/instance-action, GCE instance/preempted, Azure "
        "Scheduled Events Preempt); 0 turns it off. Only on a cloud machine (see --cloud).",
    )
    api_wait: float = Field(
        default=60.0,
        ge=0,
        description="Seconds to keep retrying a Prefect API that does not answer, or answers "
        "408, 429 or 5xx, in each of the runner's calls and (through "
        "PREFECT_CLIENT_MAX_RETRIES) Prefect's client in the flow stage, before giving up "
        "(exit code 3; 5 once the flow started).",
    )
    cancel_grace_seconds: float = Field(
        default=30.0,
        ge=0,
        description="Seconds the worker gets to stop (after a cancel, a preemption, "
        "--max-runtime or a forwarded SIGINT) before it is killed with SIGKILL.",
    )
    cancel_poll_seconds: float = Field(
        default=10.0,
        ge=0,
        description="Seconds between polls of the flow run's state for a cancel request; "
        "Prefect's events websocket tells at once, the poll is its fallback: while the "
        "websocket is subscribed it polls 6 times less often. 0: no poll.",
    )
    heartbeat_seconds: float = Field(
        default=30.0,
        ge=0,
        description="Seconds between prefect.flow-run.heartbeat events, sent by the guard "
        "from claim to the end (also while the flow holds the GIL); 0 turns them off.",
    )
    metrics_seconds: float = Field(
        default=15.0,
        ge=0,
        description="Seconds between runner.metrics events (CPU, memory, disk, network, GPU, "
        "the worker's memory), sent by the guard from claim to the end; 0 turns them off.",
    )
    cloud: str = Field(
        default="auto",
        description="Which cloud's instance metadata describes this machine (region, "
        "instance type, spot) on events: 'auto' asks the firmware (DMI) and queries only "
        f"that cloud; a cloud's name ({', '.join(clouds.CLOUDS)}) queries that one; 'none' "
        "skips it.",
    )
    metadata_url: str | None = Field(
        default=None,
        description="The instance metadata service's base URL, for tests or a proxy; "
        "default: the detected cloud's own.",
    )
    hourly_cost: float | None = Field(
        default=None,
        ge=0,
        description="What this machine costs per hour (any currency, shown as $), for the "
        "run summary's cost estimate; unset: no estimate.",
    )
    secret_env: str | None = Field(
        default=None,
        description="Names of more environment variables whose values are secrets "
        "(space- or comma-separated, e.g. 'DB_PASSWORD GITHUB_TOKEN'): masked as *** in the "
        "runner's lines and in the flow's logs, like PREFECT_API_KEY and cloud credentials "
        "always are, and forwarded into --image containers.",
    )
    price_table: Path | None = Field(
        default=None,
        description='JSON file of prices per hour by instance type, e.g. {"m5.large": 0.096, '
        '"g5.xlarge": {"on_demand": 1.006, "spot": 0.45}}: the run summary\'s cost '
        "estimate for the instance type the cloud's metadata names, when --hourly-cost is unset.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Level of the runner's own log lines."
    )

    @field_validator("workdir")
    @classmethod
    def _absolute_workdir(cls, value: Path) -> Path:
        # The worker chdirs into the run's directory: a relative workdir would then
        # point somewhere else and the cache would never be shared between runs.
        return value.expanduser().resolve()

    @field_validator("container_run_args")
    @classmethod
    def _shell_quoted(cls, value: str | None) -> str | None:
        if value:
            shlex.split(value)  # a ValueError here is one clear settings error
        return value

    @field_validator("cloud")
    @classmethod
    def _known_cloud(cls, value: str) -> str:
        if value not in _CLOUD_CHOICES:
            raise ValueError(f"unknown cloud {value!r}; choose one of {', '.join(_CLOUD_CHOICES)}")
        return value

    @model_validator(mode="after")
    def _exit_command_given(self) -> Settings:
        if self.on_exit == "command" and not self.on_exit_command:
            raise ValueError("--on-exit command needs --on-exit-command (RUNNER_ON_EXIT_COMMAND)")
        return self

    def run_id(self) -> uuid.UUID:
        """The flow run id as a UUID, or a ConfigError saying why there is none."""
        if not self.flow_run_id:
            raise ConfigError(
                "no flow run id: pass --flow-run-id ID or set RUNNER_FLOW_RUN_ID "
                "(or PREFECT__FLOW_RUN_ID)"
            )
        try:
            return uuid.UUID(self.flow_run_id)
        except ValueError:
            raise ConfigError(
                f"flow run id {self.flow_run_id!r} is not a UUID; pass the id shown in "
                "the Prefect UI or by `prefect flow-run ls`"
            ) from None

    def as_environment(self) -> dict[str, str]:
        """These settings as ``RUNNER_*`` variables, for a process that reads them again
        (the flow stage after an exec; a container)."""
        values = self.model_dump(exclude_none=True)
        return {env_var(name): str(value) for name, value in values.items()}

    def metadata_urls(self) -> dict[str, str]:
        """Each cloud's instance metadata base URL (no trailing slash), by cloud name:
        --metadata-url when set, else the cloud module's own METADATA_URL."""
        return {
            name: (self.metadata_url or clouds.load(name).METADATA_URL).rstrip("/")
            for name in clouds.CLOUDS
        }

    def run_dir(self) -> Path:
        """The per-run directory under the workdir."""
        return self.workdir / "runs" / str(self.run_id())


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment and CLI overrides, as one clear ConfigError."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None


def env_var(field_name: str) -> str:
    """The environment variable that sets a field."""
    return f"RUNNER_{field_name.upper()}"
