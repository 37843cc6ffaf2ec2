"""Suite-wide guard: a test run ends when its tests end.

A thread left running by a failed test (a writer whose peer raised, a follower
whose stop event was never set) would keep the interpreter alive after pytest has
printed its summary, and a CI job would hang instead of failing. After the session
the guard gives such threads a short grace period, names them, and exits with the
session's status (or 1, since a stray thread is itself a defect).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

_GRACE_SECONDS = 10.0
_status: dict[str, int] = {}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _status["exit"] = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    deadline = time.monotonic() + _GRACE_SECONDS
    while True:
        stray = [
            t
            for t in threading.enumerate()
            if t is not threading.main_thread() and not t.daemon and t.is_alive()
        ]
        if not stray or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if stray:
        names = ", ".join(t.name for t in stray)
        sys.stderr.write(f"\nstray non-daemon threads still running after the tests: {names}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(_status.get("exit") or 1)
