"""Worker-to-guard messages over a real pipe."""

from __future__ import annotations

import os

import pytest

from runner.channel import Inbox, Sender


def test_messages_arrive_in_order_and_torn_lines_are_skipped():
    r, w = os.pipe()
    sender, inbox = Sender(w), Inbox(r)
    sender.send("claimed")
    sender.send("finished", state="COMPLETED", name="Completed")
    os.write(w, b'{"kind": "tor')  # a worker killed mid-write
    os.close(w)
    os.set_blocking(r, False)
    assert inbox.drain() is False  # the write end is closed: EOF
    assert [m["kind"] for m in inbox.messages] == ["claimed", "finished"]
    assert inbox.last("finished")["state"] == "COMPLETED"
    assert inbox.last("error") is None
    os.close(r)


def test_drain_does_not_wait_for_a_write_end_held_open():
    r, w = os.pipe()
    os.set_blocking(r, False)
    inbox = Inbox(r)
    Sender(w).send("claimed")
    assert inbox.drain() is True  # still open (as a worker's grandchild could keep it)
    assert [m["kind"] for m in inbox.messages] == ["claimed"]
    os.close(w)
    os.close(r)


def test_send_to_a_closed_guard_does_not_raise():
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(BrokenPipeError):  # what the worker's write meets: the guard is gone
        os.write(w, b"{}\n")
    sender = Sender(w)
    assert sender.send("claimed") is None  # swallowed, and the worker goes on
    assert sender.send("finished", state="COMPLETED", name="Completed") is None
    os.close(w)
    assert Sender(-1).send("claimed") is None  # no guard at all (a container without the fd)
