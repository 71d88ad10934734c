"""End of the VM's life: run the configured exit action, exactly once per runner process."""

from __future__ import annotations

import logging
import os
import subprocess
import threading

from runner.settings import Settings

log = logging.getLogger("runner")

# Tried in order until one succeeds.
POWEROFF_COMMANDS = (["systemctl", "poweroff"], ["shutdown", "-h", "now"])


class Teardown:
    """The exit action (``--on-exit``); calling it again is a no-op, so every path
    out of the guard can call it and it still happens once."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._done = False

    def __call__(self, *, exit_code: int) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        action = self._settings.on_exit
        log.info("teardown: on-exit=%s (exit code %d)", action, exit_code)
        if action == "command":
            self._run_command(exit_code)
        elif action == "poweroff":
            self._power_off()

    def _power_off(self) -> None:
        """systemd's poweroff, else SysV's shutdown (a minimal image without systemd)."""
        for argv in POWEROFF_COMMANDS:
            try:
                done = subprocess.run(
                    argv, timeout=self._settings.on_exit_timeout, check=False, capture_output=True
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("teardown: %s failed: %s", " ".join(argv), exc)
                continue
            if done.returncode == 0:
                return
            log.warning("teardown: %s failed with code %d", " ".join(argv), done.returncode)
        log.error("teardown: could not power the machine off; it keeps running (and billing)")

    def _run_command(self, exit_code: int) -> None:
        command = self._settings.on_exit_command
        env = {
            **os.environ,
            "RUNNER_EXIT_CODE": str(exit_code),
            "RUNNER_FLOW_RUN_ID": self._settings.flow_run_id or "",
        }
        try:
            done = subprocess.run(
                command, shell=True, env=env, timeout=self._settings.on_exit_timeout, check=False
            )
        except subprocess.TimeoutExpired:
            log.error(
                "teardown: exit command still running after %gs; killed",
                self._settings.on_exit_timeout,
            )
            return
        if done.returncode != 0:
            log.error("teardown: exit command failed with code %d", done.returncode)
