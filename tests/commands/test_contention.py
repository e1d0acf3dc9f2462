"""The share of the CPUs other processes take while something is timed (Linux's /proc/stat)."""

import os
import subprocess
import sys
import time

import pytest

from crnet.commands.contention import OTHERS_WARN, OtherProcesses, _machine_busy_s

pytestmark = pytest.mark.skipif(_machine_busy_s() is None, reason="needs Linux's /proc/stat")


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_this_process_working_is_not_counted_as_others() -> None:
    others = OtherProcesses()
    spin(1.0)
    assert others.share() < OTHERS_WARN


def test_another_process_working_is_counted() -> None:
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.monotonic() + 3\nwhile time.monotonic() < end: pass"]
    )
    try:
        time.sleep(0.3)  # started
        others = OtherProcesses()
        time.sleep(1.0)
        share = others.share()
    finally:
        busy.kill()
        busy.wait()
    # one core of those this process may use: a whole core of 2 is 0.5 of them
    assert share > 0.6 / len(os.sched_getaffinity(0))
