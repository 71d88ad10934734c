"""Secrets the suite plants in every runner's environment, and the check that none of them
ever comes out: not in any test's captured output, not in what the Prefect server stored."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

PREFIX = "rvm-planted-"  # every planted value starts with it; nothing else does


def planted(name: str) -> str:
    """A fresh secret value, recognisable by the final check."""
    return f"{PREFIX}{name}-{secrets.token_hex(8)}"


# In the environment of the whole session: every runner the tests start sees a Prefect
# API key (the local server ignores it) and a --secret-env value.
SESSION_SECRETS = {
    "PREFECT_API_KEY": planted("prefect-api-key"),
    "RVM_PLANTED_SECRET": planted("secret-env"),
}
SECRET_ENV = {**SESSION_SECRETS, "RUNNER_SECRET_ENV": "RVM_PLANTED_SECRET"}

# Everything the runners printed during the session (what tests captured from them).
TRANSCRIPT = Path(
    os.environ.setdefault(
        "RVM_TEST_TRANSCRIPT", str(Path(tempfile.mkdtemp(prefix="rvm-transcript-")) / "out.log")
    )
)


def record(*texts: str | None) -> None:
    """Add captured output to the session's transcript."""
    with TRANSCRIPT.open("a", encoding="utf-8", errors="replace") as out:
        for text in texts:
            if text:
                out.write(text if text.endswith("\n") else text + "\n")


def leaks(path: Path) -> list[str]:
    """Where a planted value appears in ``path``: one short line per place, the value
    itself cut to its prefix so that the report does not leak it again."""
    data = path.read_bytes()
    found, start = [], 0
    while (at := data.find(PREFIX.encode(), start)) >= 0:
        before = data[max(0, at - 60) : at].decode("utf-8", "replace").replace("\n", " ")
        found.append(f"{path.name} @{at}: ...{before}{PREFIX}<cut>")
        start = at + len(PREFIX)
    return found
