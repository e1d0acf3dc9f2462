"""The share of the CPUs other processes take while something is timed (Linux's /proc/stat)."""

import os
import subprocess
import sys
import time

import pytest

from crnet.commands import contention
from crnet.commands.contention import OtherProcesses, _machine_busy_s, _own_s

pytestmark = pytest.mark.skipif(_machine_busy_s() is None, reason="needs Linux's /proc/stat")


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_the_machines_busy_time_holds_this_process_own() -> None:
    # /proc/stat's ticks and os.times() in the same unit, over the CPUs this process runs on: whatever else
    # runs (a test suite's other workers on the GPU machine), the machine was busy at least as long as we were
    machine, own = _machine_busy_s(), _own_s()
    spin(1.0)
    machine, own = _machine_busy_s() - machine, _own_s() - own
    assert own > 0.5
    assert machine >= 0.9 * own


def test_this_process_working_is_not_counted_as_others(monkeypatch) -> None:
    # a machine where only this process works: its busy time is ours, plus a kernel thread's constant
    monkeypatch.setattr(contention, "_machine_busy_s", lambda cpus=None: _own_s() + 7.0)
    others = OtherProcesses()
    spin(0.5)
    assert others.share() == pytest.approx(0.0, abs=0.02)


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
