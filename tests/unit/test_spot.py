"""Spot/preemption notices, polled from the loopback stand-in for each cloud's metadata
service: nothing before the cloud posts one, ``on_notice`` exactly once after."""

from __future__ import annotations

import threading
import time
import urllib.error
from collections.abc import Callable, Iterator

import pytest

from devtools.metadata_servers import MetadataServer
from devtools.server_process import free_port
from runner.vm.metadata import fetch
from runner.vm.spot import SpotWatch

POLL = 0.1
NOTICE_PATHS = {
    "aws": "/latest/meta-data/spot/instance-action",
    "gcp": "/computeMetadata/v1/instance/preempted",
    "azure": "/metadata/scheduledevents",
}
NAMES = {"aws": "AWS", "gcp": "GCE", "azure": "Azure"}


class Notices:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.fired = threading.Event()

    def __call__(self, description: str) -> None:
        self.seen.append(description)
        self.fired.set()


@pytest.fixture
def imds() -> Iterator[MetadataServer]:
    with MetadataServer() as server:
        yield server


def _urls(url: str) -> dict[str, str]:
    return {"aws": url, "gcp": url, "azure": url}


def _polls(imds: MetadataServer, cloud: str) -> int:
    return sum(path.startswith(NOTICE_PATHS[cloud]) for _, path in imds.requests)


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _stop_promptly(watch: SpotWatch) -> None:
    started = time.monotonic()
    watch.stop()
    assert time.monotonic() - started < 0.1


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_a_notice_fires_once_and_only_after_the_cloud_posts_it(imds, cloud):
    notices = Notices()
    watch = SpotWatch(cloud, _urls(imds.url), poll_seconds=POLL, on_notice=notices)
    watch.start()
    try:
        _wait_for(lambda: _polls(imds, cloud) >= 4)
        assert notices.seen == []

        imds.preempt(cloud)
        assert notices.fired.wait(2 * POLL + 1.0)  # two ticks, plus a slow machine's slack
        polls = _polls(imds, cloud)
        time.sleep(5 * POLL)

        assert len(notices.seen) == 1 and NAMES[cloud] in notices.seen[0]
        assert _polls(imds, cloud) == polls  # the thread ended with the notice
    finally:
        _stop_promptly(watch)


def test_the_descriptions(imds):
    for cloud in ("aws", "gcp", "azure"):
        imds.preempt(cloud)
    seen = {}
    for cloud in ("aws", "gcp", "azure"):
        notices = Notices()
        watch = SpotWatch(cloud, _urls(imds.url), poll_seconds=POLL, on_notice=notices)
        watch.start()
        assert notices.fired.wait(5)
        watch.stop()
        seen[cloud] = notices.seen[0]

    action = imds.aws_instance_action
    assert action is not None
    assert seen["aws"] == f"AWS spot interruption notice: terminate at {action['time']}"
    assert seen["gcp"] == "GCE preempted the instance"
    assert seen["azure"].startswith("Azure Scheduled Event Preempt (NotBefore ")
    assert seen["azure"].endswith(" GMT)")


def test_azure_maintenance_and_other_vms_preemptions_are_not_this_vms_notice(imds):
    notices = Notices()
    watch = SpotWatch("azure", _urls(imds.url), poll_seconds=POLL, on_notice=notices)
    watch.start()
    try:
        for event_type in ("Freeze", "Reboot", "Redeploy", "Terminate"):
            imds.schedule_azure_event(event_type)
        imds.schedule_azure_event("Preempt", resources=["another-vm-in-the-scale-set"])
        polls = _polls(imds, "azure")
        _wait_for(lambda: _polls(imds, "azure") >= polls + 4)
        assert notices.seen == []

        imds.preempt("azure")
        assert notices.fired.wait(5)
        assert len(notices.seen) == 1
    finally:
        _stop_promptly(watch)


def test_aws_asks_for_a_new_token_when_the_old_one_is_refused(imds):
    with pytest.raises(urllib.error.HTTPError) as refused:
        fetch(imds.url + NOTICE_PATHS["aws"], {})
    assert refused.value.code == 401  # no token, no answer: IMDSv2 only

    notices = Notices()
    watch = SpotWatch("aws", _urls(imds.url), poll_seconds=POLL, on_notice=notices)
    watch.start()
    try:
        _wait_for(lambda: _polls(imds, "aws") >= 3)
        imds.expire_token()
        imds.preempt("aws")
        assert notices.fired.wait(5)
    finally:
        _stop_promptly(watch)

    tokens = [path for method, path in imds.requests if method == "PUT"]
    assert tokens == ["/latest/api/token"] * 2  # one at the start, one after the 401


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_an_unreachable_service_never_fires(cloud):
    notices = Notices()
    dead = f"http://127.0.0.1:{free_port()}"
    watch = SpotWatch(cloud, _urls(dead), poll_seconds=POLL, on_notice=notices)
    watch.start()
    time.sleep(5 * POLL)
    _stop_promptly(watch)

    assert notices.seen == []


def test_off_cloud_or_poll_off_asks_nothing(imds):
    notices = Notices()
    watches = [
        SpotWatch("none", _urls(imds.url), poll_seconds=POLL, on_notice=notices),
        SpotWatch("aws", _urls(imds.url), poll_seconds=0, on_notice=notices),
    ]
    imds.preempt("aws")
    for watch in watches:
        watch.start()
    time.sleep(3 * POLL)
    for watch in watches:
        _stop_promptly(watch)

    assert imds.requests == [] and notices.seen == []


def test_no_notice_after_stop(imds):
    notices = Notices()
    watch = SpotWatch("gcp", _urls(imds.url), poll_seconds=POLL, on_notice=notices)
    watch.start()
    _wait_for(lambda: _polls(imds, "gcp") >= 2)
    _stop_promptly(watch)
    imds.preempt("gcp")
    time.sleep(3 * POLL)

    assert notices.seen == []
