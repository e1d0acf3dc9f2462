"""How much of the CPUs other processes took while something was timed. A bench that shares its cores times
the sharing: two benches at once on 2 cores timed tiny's torch fp32 episode at 2436 and 2504 ms, against 21
ms alone (docs/BENCHMARKS.md, CPU-2c).

The busy time of the CPUs this process may run on (/proc/stat, hypervisor steal included) less this
process's own CPU time (all its threads: torch's, ONNX Runtime's) over the same wall time. Linux only; None
elsewhere. On a GPU: the other processes that hold a compute context on the same GPU (nvidia-smi), which
may run work beside the timed calls; None where that cannot be told.
"""

from __future__ import annotations

import os
import subprocess
import time

OTHERS_WARN = 0.10  # of the CPUs this process may use: more than background noise (a shell, kernel threads)


def _cpus() -> set[int]:
    """The CPUs this process may run on (a container's or taskset's, not the host's)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _machine_busy_s(cpus: set[int] | None = None) -> float | None:
    """Seconds of CPU time `cpus` (by default this process's) have been busy, or None without /proc/stat.
    Only those CPUs: on a shared host, other tenants' work on other cores is no contention."""
    cpus = _cpus() if cpus is None else cpus
    try:
        with open("/proc/stat") as stat:
            lines = [line.split() for line in stat if line.startswith("cpu") and line[3:4].isdigit()]
    except OSError:
        return None
    busy = 0
    for fields in lines:
        if int(fields[0][3:]) in cpus:
            # user nice system idle iowait irq softirq steal (guest time is inside user already)
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
            busy += user + nice + system + irq + softirq + steal
    return busy / os.sysconf("SC_CLK_TCK") if lines else None


def _own_s() -> float:
    times = os.times()
    return times.user + times.system


class OtherProcesses:
    """Started before the timed work, `share()` after: the fraction of the CPUs this process may run on
    that other processes (and the hypervisor) used meanwhile, or None where it cannot be read."""

    def __init__(self):
        self.cpus = _cpus()
        self.start = (_machine_busy_s(self.cpus), _own_s(), time.monotonic())

    def share(self) -> float | None:
        busy, own, wall = _machine_busy_s(self.cpus), _own_s(), time.monotonic()
        if busy is None or self.start[0] is None:
            return None
        elapsed = (wall - self.start[2]) * len(self.cpus)
        if elapsed <= 0:
            return None
        others = (busy - self.start[0]) - (own - self.start[1])
        return min(1.0, max(0.0, others / elapsed))


def _gpu_uuid(device) -> str | None:
    """The GPU's UUID as nvidia-smi prints it without its "GPU-" prefix, lower case; None off CUDA."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid).lower().removeprefix("gpu-")
    except (AttributeError, RuntimeError):
        return None
    return uuid or None  # an empty one would match every GPU's processes


def _compute_processes(uuid: str) -> int | None:
    """How many processes hold a compute context on the GPU `uuid` (this one included), by nvidia-smi;
    None without it, or where it lists none on this GPU (a container that hides processes: this one holds
    a context while it times, so it would be listed)."""
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=gpu_uuid,pid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    here = [line for line in listed.splitlines() if line.split(",")[0].strip().lower().endswith(uuid)]
    return len(here) or None


class OtherGPUProcesses:
    """Started before the timed work, `count()` after: the most processes besides this one that held a
    compute context on `device`'s GPU at either end, or None where it cannot be told (not a CUDA device,
    no nvidia-smi, processes hidden)."""

    def __init__(self, device):
        self.uuid = _gpu_uuid(device)
        self.start = None if self.uuid is None else _compute_processes(self.uuid)

    def count(self) -> int | None:
        if self.uuid is None:
            return None
        counts = [n for n in (self.start, _compute_processes(self.uuid)) if n is not None]
        return max(counts) - 1 if counts else None
