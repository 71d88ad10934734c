"""Settings from the VM's user-data: a KEY=VALUE file (``RUNNER_*``, ``PREFECT_*``...) that
ranks below the environment, waited for until it names a flow run (the claim deadline)."""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dotenv.parser import parse_stream
from pydantic import ValidationError

from runner.errors import BootstrapError, ConfigError
from runner.settings import Settings, env_var

log = logging.getLogger("runner")

RUN_ID_KEYS = ("RUNNER_FLOW_RUN_ID", "PREFECT__FLOW_RUN_ID")
_POLL_SECONDS = 0.5
# What a RUNNER_ variable may be: a setting's own, or the run id's alias.
_SETTINGS_KEYS = {env_var(name) for name in Settings.model_fields} | set(RUN_ID_KEYS)


class UserDataError(ConfigError):
    """The user-data file cannot be used (a line that is not KEY=VALUE, an unknown or
    invalid ``RUNNER_`` setting, bytes that are not UTF-8). ``values`` holds what its
    good lines said, so the run it names can still be ended (guard.py)."""

    def __init__(self, message: str, *, values: dict[str, str]) -> None:
        super().__init__(message)
        self.values = values

    def flow_run_id(self) -> str | None:
        return next((self.values[key] for key in RUN_ID_KEYS if self.values.get(key)), None)


@dataclass(frozen=True)
class UserData:
    """The file as read: its variables, the line each came from, and its first problem."""

    values: dict[str, str] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    problem: str | None = None

    def names_a_run(self) -> bool:
        return any(self.values.get(key) for key in RUN_ID_KEYS)


def settle(
    settings: Settings, *, stopped: Callable[[], str | None], poll: float = _POLL_SECONDS
) -> Settings:
    """``settings`` with the user-data file's values below them. While no flow run id is
    known, wait for the file to name one, up to ``--claim-timeout`` (cloud-init may write
    it after the runner started at boot); ``stopped()`` names a signal that ends the wait.
    A problem in the file is fatal once it names a run (or at the deadline): before
    that, it may be a file still being written."""
    path = settings.user_data_file
    if path is None:
        return settings
    deadline = time.monotonic() + settings.claim_timeout
    waiting = False
    data = read(path)
    while not (settings.flow_run_id or data.names_a_run()):
        if signal_name := stopped():
            raise BootstrapError(
                f"stopped by {signal_name} while waiting for a flow run id in {path}"
            )
        if time.monotonic() >= deadline:
            if data.problem:
                raise UserDataError(data.problem, values=data.values)
            raise ConfigError(
                f"no flow run id arrived in {path} within {settings.claim_timeout:g}s; the "
                "VM's user-data must set RUNNER_FLOW_RUN_ID (README: 'User data')"
            )
        if not waiting:
            log.info("waiting up to %gs for a flow run id in %s", settings.claim_timeout, path)
            waiting = True
        time.sleep(poll)
        data = read(path)
    if data.problem:
        raise UserDataError(data.problem, values=data.values)
    for key, value in data.values.items():
        os.environ.setdefault(key, value)  # the environment wins over user-data
    # Flags and variables given so far still win: they are the fields already set.
    try:
        return Settings(**settings.model_dump(exclude_unset=True))
    except ValidationError as exc:
        raise _invalid(exc, path, data) from None


def read(path: Path) -> UserData:
    """The file's variables (none while it does not exist yet), and its first problem."""
    try:
        raw = path.read_bytes()
    except OSError:  # missing, or not readable yet
        return UserData()
    problem = None
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        problem = (
            f"user-data file {path}, line {line}: byte 0x{raw[exc.start]:02x} is not UTF-8 "
            "text; write the file as UTF-8"
        )
        text = raw.decode(errors="replace")  # the other lines may still name the run
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    for binding in parse_stream(io.StringIO(text)):
        # A binding's text starts with the blank lines before it.
        original = binding.original.string
        line = binding.original.line + original[: len(original) - len(original.lstrip())].count(
            "\n"
        )
        if binding.key is None and not binding.error:
            continue  # a comment or blank line
        if binding.error or binding.value is None:  # unparsable, or a bare word
            problem = problem or (
                f"user-data file {path}, line {line}: not a KEY=VALUE line (systemd "
                "EnvironmentFile syntax: one variable per line, '#' comments)"
            )
        else:
            key = binding.key.upper()  # settings match names in any case
            if key.startswith("RUNNER_") and key not in _SETTINGS_KEYS:
                problem = problem or (
                    f"user-data file {path}, line {line}: unknown setting {binding.key} "
                    "(python -m runner --help lists every RUNNER_ variable)"
                )
            values[binding.key] = binding.value
            lines[binding.key] = line
    return UserData(values, lines, problem)


def _invalid(exc: ValidationError, path: Path, data: UserData) -> ConfigError:
    """A settings error, naming the user-data line when the bad value came from there."""
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        key = name if name in _SETTINGS_KEYS else env_var(name)  # an alias, or a field
        line = data.lines.get(key)
        if line is not None and os.environ.get(key) == data.values.get(key):
            problems.append(f"user-data file {path}, line {line}: {key}: {error['msg']}")
        elif not name and any(k.upper().startswith("RUNNER_") for k in data.values):
            # A rule across settings (--on-exit command needs its command): the file
            # set some of them.
            problems.append(f"user-data file {path}: {error['msg']}")
        else:
            problems.append(f"{name or 'settings'}: {error['msg']}")
    message = "; ".join(problems)
    if any(problem.startswith("user-data file") for problem in problems):
        return UserDataError(message, values=data.values)
    return ConfigError(f"invalid settings: {message}")
