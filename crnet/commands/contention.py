"""How much of the CPUs other processes took while something was timed. A bench that shares its cores times
the sharing: two benches at once on 2 cores timed tiny's torch fp32 episode at 2436 and 2504 ms, against 21
ms alone (docs/BENCHMARKS.md, CPU-2c).

The machine's busy time (/proc/stat, hypervisor steal included) less this process's own CPU time (all its
threads: torch's, ONNX Runtime's) over the same wall time. Linux only; None elsewhere.
"""

from __future__ import annotations

import os
import time

OTHERS_WARN = 0.10  # of all CPUs: more than background noise (a shell, the kernel's threads)


def _machine_busy_s() -> float | None:
    """Seconds of CPU time the whole machine has been busy (all CPUs), or None without /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    times = os.times()
    return times.user + times.system


class OtherProcesses:
    """Started before the timed work, `share()` after: the fraction of all CPUs that other processes (and
    the hypervisor) used meanwhile, or None where it cannot be read."""

    def __init__(self):
        self.start = (_machine_busy_s(), _own_s(), time.monotonic())

    def share(self) -> float | None:
        busy, own, wall = _machine_busy_s(), _own_s(), time.monotonic()
        if busy is None or self.start[0] is None:
            return None
        elapsed = (wall - self.start[2]) * (os.cpu_count() or 1)
        if elapsed <= 0:
            return None
        others = (busy - self.start[0]) - (own - self.start[1])
        return min(1.0, max(0.0, others / elapsed))
