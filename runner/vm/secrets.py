"""Secrets a VM fetches at start instead of carrying them in its user-data: the Prefect API
key from an AWS SSM SecureString parameter, with the machine's own role."""

from __future__ import annotations

import contextlib
import os

from runner import redaction
from runner.errors import ConfigError
from runner.settings import Settings


def fetch_api_key(settings: Settings) -> None:
    """Put the API key named by ``--prefect-api-key-ssm`` into the environment (masked from
    here on), unless PREFECT_API_KEY is set already. ConfigError naming the parameter,
    never its value, when it cannot be read."""
    name = settings.prefect_api_key_ssm
    if not name or os.environ.get("PREFECT_API_KEY"):
        return
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise ConfigError(
            "--prefect-api-key-ssm needs boto3: pip install 'prefect-vm-runner[s3]'"
        ) from None
    ssm = boto3.client("ssm")
    try:
        response = ssm.get_parameter(Name=name, WithDecryption=True)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        raise ConfigError(
            f"could not read the Prefect API key from SSM parameter {name}: {code}; the "
            "machine's role needs ssm:GetParameter on it (and kms:Decrypt on its key)"
        ) from None
    except BotoCoreError as exc:
        raise ConfigError(f"could not read SSM parameter {name}: {exc}") from None
    os.environ["PREFECT_API_KEY"] = response["Parameter"]["Value"]
    redaction.watch(None)  # the value is a secret by its variable's name: re-read them
    # One use: gone once read, where the role may delete it (ssm:DeleteParameter); the
    # worker deletes it with the VM in any case.
    with contextlib.suppress(ClientError, BotoCoreError):
        ssm.delete_parameter(Name=name)
