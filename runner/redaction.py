"""Secret values the runner must never print, and the mask that keeps them out of its lines,
the run's logs in Prefect, its events, its artifact and state messages.

The values are read from the environment: the credential variables below, every
``UV_INDEX_<NAME>_PASSWORD``, the password in an index URL, the parts of an Azure
connection string, and each variable named in ``RUNNER_SECRET_ENV`` (``--secret-env``).
Secrets are passed to the runner and its children in the environment only, never on a
command line, so none of them is in a process listing either."""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["MASK", "MaskFilter", "mask", "mask_all_handlers", "scrub", "secret_names", "watch"]

MASK = "***"

# Variables whose whole value is a credential.
CREDENTIAL_VARIABLES = (
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
    "UV_INDEX_PASSWORD",
    "DASK_COILED__TOKEN",
    "COILED_TOKEN",
)
# Variables holding a URL whose user:password part is a credential.
URL_VARIABLES = (
    "RUNNER_INDEX_URL",
    "RUNNER_EXTRA_INDEX_URL",
    "UV_INDEX_URL",
    "UV_EXTRA_INDEX_URL",
    "UV_DEFAULT_INDEX",
    "UV_INDEX",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
)
SECRET_ENV_VARIABLE = "RUNNER_SECRET_ENV"
_INDEX_PASSWORD = re.compile(r"UV_INDEX_\w+_PASSWORD")
# Shorter values are left alone: masking "1" or "true" would garble every line.
MIN_LENGTH = 6

_values: list[str] | None = None


def watch(names: str | None) -> None:
    """Also mask the values of the variables ``names`` (space- or comma-separated), here
    and, through ``RUNNER_SECRET_ENV``, in every process the runner starts."""
    global _values
    given = _split(names)
    if given:
        known = _split(os.environ.get(SECRET_ENV_VARIABLE))
        os.environ[SECRET_ENV_VARIABLE] = " ".join(dict.fromkeys([*known, *given]))
    _values = None


def secret_names(environ: os._Environ[str] | dict[str, str]) -> list[str]:
    """The variables ``--secret-env`` names."""
    return _split(environ.get(SECRET_ENV_VARIABLE))


def mask(text: str) -> str:
    """``text`` with every secret value replaced by ``***``."""
    for value in _secret_values():
        if value in text:
            text = text.replace(value, MASK)
    return text


def scrub(data: Any) -> Any:
    """A copy of JSON-like ``data`` (an event, a payload) with every string masked."""
    if isinstance(data, str):
        return mask(data)
    if isinstance(data, dict):
        return {key: scrub(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [scrub(value) for value in data]
    return data


class MaskFilter(logging.Filter):
    """Masks a record in place before any handler formats it, traceback included; on a
    handler, it covers every line that handler writes (stderr, Prefect's API)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _secret_values():
            return True
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = mask(message), None
        if record.exc_text:
            record.exc_text = mask(record.exc_text)
        return True


def mask_all_handlers() -> None:
    """Put the mask on every handler configured so far: Prefect's console and API log
    handlers, so that the flow's own logs (prints with log_prints too) are masked."""
    manager = logging.Logger.manager
    loggers = [logging.getLogger(), *manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):  # placeholders have none
            if not any(isinstance(f, MaskFilter) for f in handler.filters):
                handler.addFilter(MaskFilter())


def _secret_values() -> list[str]:
    global _values
    if _values is None:
        _values = _read_values(os.environ)
    return _values


def _read_values(environ: os._Environ[str] | dict[str, str]) -> list[str]:
    found: set[str] = set()
    names = [
        *CREDENTIAL_VARIABLES,
        *(name for name in environ if _INDEX_PASSWORD.fullmatch(name)),
        *_split(environ.get(SECRET_ENV_VARIABLE)),
    ]
    for name in names:
        if value := environ.get(name):
            found.add(value)
            found.update(_connection_string_parts(value))
    for name in URL_VARIABLES:
        for url in (environ.get(name) or "").split():
            found.update(_url_credentials(url))
    # Longest first, so that a secret containing another is masked whole.
    return sorted((v for v in found if len(v) >= MIN_LENGTH), key=len, reverse=True)


def _connection_string_parts(value: str) -> list[str]:
    """An Azure connection string's key or SAS token, which a message may hold on its own."""
    parts = []
    for item in value.split(";"):
        name, _, part = item.partition("=")
        if name.strip().lower() in ("accountkey", "sharedaccesssignature") and part:
            parts.append(part.strip())
    return parts


def _url_credentials(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = []
    if parts.password:
        found += [parts.password, unquote(parts.password)]
    if "@" in parts.netloc:
        found.append(parts.netloc.rpartition("@")[0])  # user:password as written
    return found


def _split(names: str | None) -> list[str]:
    return [name for name in re.split(r"[\s,]+", names or "") if name]
