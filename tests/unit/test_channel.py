"""Worker-to-guard messages over a real pipe."""

from __future__ import annotations

import os

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
    Sender(w).send("claimed")  # EPIPE is swallowed: the guard is gone
    os.close(w)
