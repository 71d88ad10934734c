"""AWS: the EC2 firmware's strings, the machine from IMDSv2, and the spot interruption notice."""

from __future__ import annotations

import json
import urllib.error

from runner.vm.clouds import NoticeCheck
from runner.vm.metadata import Dmi, Machine, fetch

METADATA_URL = "http://169.254.169.254"  # IMDSv2: a token PUT, then GETs
_NOTICE_TOKEN_TTL_SECONDS = 21600  # the most IMDSv2 allows; a 401 fetches a new one anyway


def in_dmi(dmi: Dmi) -> bool:
    return "Amazon EC2" in dmi.vendor or dmi["bios_vendor"].startswith("Amazon")


def machine(base: str) -> Machine:
    headers = _headers(_session_token(base))

    def meta(path: str) -> str:
        return fetch(f"{base}/latest/meta-data/{path}", headers)

    return Machine(
        cloud="aws",
        instance_id=meta("instance-id"),
        region=meta("placement/region"),
        instance_type=meta("instance-type"),
        spot=meta("instance-life-cycle") == "spot",
    )


def _session_token(base: str, ttl_seconds: int = 60) -> str:
    """An IMDSv2 session token, sent as ``X-aws-ec2-metadata-token`` on every GET."""
    ttl = {"X-aws-ec2-metadata-token-ttl-seconds": str(ttl_seconds)}
    return fetch(f"{base}/latest/api/token", ttl, "PUT")


def _headers(session_token: str) -> dict[str, str]:
    return {"X-aws-ec2-metadata-token": session_token}


def spot_notice(base: str) -> NoticeCheck:
    return _SpotNotice(base)


class _SpotNotice:
    """``spot/instance-action``, which is 404 until AWS schedules the interruption; one
    long-lived token for all the polls, renewed when it is refused."""

    def __init__(self, base: str) -> None:
        self._base = base
        self._token: str | None = None

    def __call__(self) -> str | None:
        for attempt in range(2):
            if self._token is None:
                self._token = _session_token(self._base, _NOTICE_TOKEN_TTL_SECONDS)
            try:
                body = fetch(
                    f"{self._base}/latest/meta-data/spot/instance-action", _headers(self._token)
                )
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                if exc.code == 401 and attempt == 0:  # the token expired: one new try
                    self._token = None
                    continue
                raise
            notice = json.loads(body)
            return f"AWS spot interruption notice: {notice['action']} at {notice['time']}"
        return None
