"""How a dead worker is described: signal, exit code, peak memory, likely OOM."""

from __future__ import annotations

import os
import sys

from runner.crash import Stop, WorkerExit, memory_limit

GiB = 1024**3


def _status_of(code: str) -> int:
    """A real wait status from a real child process."""
    pid = os.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-c", code])
    return os.waitpid(pid, 0)[1]


def test_sigkill_near_the_limit_is_likely_oom():
    status = _status_of("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    ended = WorkerExit(status=status, peak_rss_bytes=int(1.9 * GiB), memory_limit_bytes=2 * GiB)
    text = ended.describe()
    assert "killed by SIGKILL" in text
    assert "peak RSS 1.9 GiB of 2.0 GiB" in text
    assert text.endswith("likely out of memory")


def test_sigkill_far_from_the_limit_is_not_called_oom():
    status = _status_of("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    ended = WorkerExit(status=status, peak_rss_bytes=100 * 1024**2, memory_limit_bytes=8 * GiB)
    assert "out of memory" not in ended.describe()


def test_oom_kill_counter_marks_oom_whatever_the_rss():
    status = _status_of("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    ended = WorkerExit(status=status, peak_rss_bytes=1, memory_limit_bytes=8 * GiB, oom_kills=1)
    assert ended.likely_oom()


def test_segfault_and_exit_code():
    segv = WorkerExit(
        status=_status_of("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"),
        peak_rss_bytes=0,
    )
    assert "killed by SIGSEGV" in segv.describe()
    code = WorkerExit(status=_status_of("raise SystemExit(7)"), peak_rss_bytes=0)
    assert "exited with code 7" in code.describe()


def test_guard_kill_after_grace_is_not_oom():
    ended = WorkerExit(
        status=_status_of("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"),
        peak_rss_bytes=2 * GiB,
        memory_limit_bytes=2 * GiB,
        stop=Stop("interrupt", "SIGINT"),
        killed_by_guard=True,
    )
    assert "did not stop after SIGINT" in ended.describe()
    assert not ended.likely_oom()


def test_memory_limit_is_positive_and_at_most_ram():
    import psutil

    assert 0 < memory_limit() <= psutil.virtual_memory().total
