"""The runner's exception tree and the exit code each outcome maps to.

Every failure the runner knows about is one of these; third-party errors are
translated at the boundary (``raise ApiUnreachable(...) from exc``) so that the
guard and the CLI only ever see this tree::

    RunnerError                      base; never raised directly
    ├── ConfigError                  exit 2  bad flag, setting or flow run id
    │   ├── FlowRunNotFound                  the API has no such flow run
    │   ├── UnsupportedUrl                   a storage URL with a scheme no backend serves
    │   ├── MissingDependency                an optional SDK is not installed (says the pip command)
    │   └── EnvSpecError                     an environment spec that cannot be read or used
    ├── BootstrapError               exit 3  infrastructure fault before the flow ran
    │   ├── ApiUnreachable                   Prefect API not reachable within --api-wait
    │   ├── CodeLoadError                    the deployment's code could not be loaded
    │   ├── StorageError                     a bucket operation failed
    │   │   ├── StorageNotFound              the object or its bucket/container does not exist
    │   │   ├── AccessDenied                 credentials missing or not allowed
    │   │   └── TransientStorageError        worth retrying: 5xx, throttling, timeouts, resets
    │   ├── BundleError                      the bundle is unusable: digest mismatch, corrupt,
    │   │                                    unsafe member, too large, shadows the runner
    │   └── EnvBuildError                    the flow's environment or image could not be made
    │                                        ready: uv failed, wrong Python, no podman/docker
    └── NotExecuted                  exit 4  run already claimed, running or final

Outcomes that are not exceptions but still have a code: the flow ran and
Completed, or it was preempted and rescheduled (0); the flow ran and ended
Failed or Cancelled (1); the worker died, ran past --max-runtime, or the run
ended Crashed (5).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The documented process exit codes (README: "Exit codes")."""

    COMPLETED = 0
    FLOW_FAILED = 1
    CONFIG_ERROR = 2
    BOOTSTRAP_ERROR = 3
    NOT_EXECUTED = 4
    CRASHED = 5


class RunnerError(Exception):
    """Base of every error the runner reports; ``str()`` is the one line users see."""

    exit_code: ExitCode = ExitCode.BOOTSTRAP_ERROR


class ConfigError(RunnerError):
    exit_code = ExitCode.CONFIG_ERROR


class FlowRunNotFound(ConfigError):
    pass


class BootstrapError(RunnerError):
    exit_code = ExitCode.BOOTSTRAP_ERROR


class ApiUnreachable(BootstrapError):
    pass


class CodeLoadError(BootstrapError):
    pass


class UnsupportedUrl(ConfigError):
    pass


class MissingDependency(ConfigError):
    pass


class EnvSpecError(ConfigError):
    pass


class StorageError(BootstrapError):
    pass


class StorageNotFound(StorageError):
    pass


class AccessDenied(StorageError):
    pass


class TransientStorageError(StorageError):
    pass


class BundleError(BootstrapError):
    pass


class EnvBuildError(BootstrapError):
    pass


class NotExecuted(RunnerError):
    exit_code = ExitCode.NOT_EXECUTED


def exit_code_for_state(state_type: str | None) -> ExitCode:
    """Map a final Prefect state type (``COMPLETED``, ``FAILED``...) to an exit code."""
    if state_type == "COMPLETED":
        return ExitCode.COMPLETED
    if state_type == "CRASHED" or state_type is None:
        return ExitCode.CRASHED
    return ExitCode.FLOW_FAILED


def internal_error_line(exc: BaseException) -> str:
    """The one line for an error outside this tree (a bug, an OS failure): exit code 3."""
    return f"internal error in the runner: {type(exc).__name__}: {exc}"


def output_tail(output: str, lines: int) -> str:
    """The last ``lines`` non-blank lines of a tool's output, on one line ("" if none):
    what an error line quotes of podman or uv."""
    kept = [line.strip() for line in output.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])
