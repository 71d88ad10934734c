"""The one retry helper: attempts, time budget, the waits between, what is not retried."""

from __future__ import annotations

import itertools
import time

import pytest

from runner.retry import Backoff, retry


class Flaky(Exception):
    pass


def failing(times: int, error: type[Exception] = Flaky):
    calls = itertools.count(1)

    def call() -> int:
        n = next(calls)
        if n <= times:
            raise error(f"try {n}")
        return n

    return call


def test_backoff_doubles_up_to_its_most():
    assert list(itertools.islice(Backoff(0.5, most=5.0).delays(), 6)) == [
        0.5, 1.0, 2.0, 4.0, 5.0, 5.0,
    ]  # fmt: skip


def test_retries_until_the_call_returns_saying_each_retry():
    said = []
    result = retry(
        failing(2),
        on=Flaky,
        backoff=Backoff(0.01),
        attempts=5,
        before_retry=lambda exc, n, wait: said.append((str(exc), n, wait)),
    )
    assert result == 3
    assert said == [("try 1", 1, 0.01), ("try 2", 2, 0.02)]


def test_the_last_error_is_raised_once_the_attempts_are_spent():
    with pytest.raises(Flaky, match="try 3"):
        retry(failing(5), on=Flaky, backoff=Backoff(0.001), attempts=3)


def test_a_time_budget_cuts_the_last_wait_and_then_raises():
    started = time.monotonic()
    with pytest.raises(Flaky):
        retry(failing(100), on=Flaky, backoff=Backoff(10.0), seconds=0.3)
    assert 0.3 <= time.monotonic() - started < 5.0  # the 10 s wait was cut to the budget


def test_no_budget_left_means_one_try():
    with pytest.raises(Flaky, match="try 1"):
        retry(failing(1), on=Flaky, backoff=Backoff(0.5), seconds=0)


def test_other_errors_are_not_retried():
    with pytest.raises(KeyError):
        retry(failing(1, KeyError), on=Flaky, backoff=Backoff(0.001), attempts=5)
