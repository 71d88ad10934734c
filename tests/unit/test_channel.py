"""Worker-to-guard messages over a real pipe."""

from __future__ import annotations

import json
import os

import pytest

from runner.channel import (
    Claimed,
    Container,
    Error,
    Finished,
    Inbox,
    Phase,
    Sender,
    decode,
    encode,
)


def test_messages_arrive_in_order_and_torn_lines_are_skipped():
    r, w = os.pipe()
    sender, inbox = Sender(w), Inbox(r)
    sender.send(Claimed())
    sender.send(Finished(state="COMPLETED", name="Completed"))
    os.write(w, b'{"kind": "tor')  # a worker killed mid-write
    os.close(w)
    os.set_blocking(r, False)
    assert inbox.drain() is False  # the write end is closed: EOF
    assert [m.kind for m in inbox.messages] == ["claimed", "finished"]
    assert inbox.last(Finished).state == "COMPLETED"
    assert inbox.last(Error) is None
    os.close(r)


def test_drain_does_not_wait_for_a_write_end_held_open():
    r, w = os.pipe()
    os.set_blocking(r, False)
    inbox = Inbox(r)
    Sender(w).send(Claimed())
    assert inbox.drain() is True  # still open (as a worker's grandchild could keep it)
    assert [m.kind for m in inbox.messages] == ["claimed"]
    os.close(w)
    os.close(r)


def test_send_to_a_closed_guard_does_not_raise():
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(BrokenPipeError):  # what the worker's write meets: the guard is gone
        os.write(w, b"{}\n")
    sender = Sender(w)
    assert sender.send(Claimed()) is None  # swallowed, and the worker goes on
    assert sender.send(Finished(state="COMPLETED", name="Completed")) is None
    os.close(w)
    assert Sender(-1).send(Claimed()) is None  # no guard at all (a container without the fd)


# The JSON lines as a worker of an earlier release writes them (a container image built
# with it): this guard must read each one as it always did.
WIRE = [
    (
        b'{"kind":"claimed","resource":{"prefect.resource.id":"prefect.flow-run.1"},'
        b'"related":[],"run_count":2}',
        Claimed(resource={"prefect.resource.id": "prefect.flow-run.1"}, related=[], run_count=2),
    ),
    (
        b'{"kind":"phase","name":"env-ready","environment":"uv","seconds":1.5,"cache_hit":true}',
        Phase("env-ready", {"environment": "uv", "seconds": 1.5, "cache_hit": True}),
    ),
    (b'{"kind":"container","cli":"podman","name":"rvm-1"}', Container(cli="podman", name="rvm-1")),
    (b'{"kind":"error","message":"no such bundle","exit_code":2}', Error("no such bundle", 2)),
    (
        b'{"kind":"finished","state":"FAILED","name":"Failed","message":"boom"}',
        Finished(state="FAILED", name="Failed", message="boom"),
    ),
]


@pytest.mark.parametrize(("line", "message"), WIRE, ids=[m.kind for _, m in WIRE])
def test_each_message_reads_and_writes_the_json_it_always_had(line, message):
    assert decode(json.loads(line)) == message
    assert json.loads(encode(message)) == json.loads(line)


def test_what_this_guard_does_not_know_is_skipped_not_fatal():
    r, w = os.pipe()
    os.set_blocking(r, False)
    inbox = Inbox(r)
    os.write(w, b'{"kind":"from-a-newer-worker","x":1}\n')  # a kind added later
    os.write(w, b'{"kind":"claimed","run_count":1,"added_later":true}\n')  # a field added later
    os.write(w, b'{"kind":"error","message":"no exit code"}\n')  # a field missing
    os.write(w, b"[1, 2]\n42\n")  # not an object at all
    os.close(w)
    assert inbox.drain() is False
    assert inbox.messages == [Claimed(run_count=1)]
    os.close(r)
