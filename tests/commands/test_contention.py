"""The share of the CPUs other processes take while something is timed (Linux's /proc/stat)."""

import os
import subprocess
import sys
import time

import pytest

from crnet.commands import contention
from crnet.commands.contention import OtherGPUProcesses, OtherProcesses, _machine_busy_s, _own_s

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


UUID = "0b42632a-bc5c-f731-724b-6936a19c4b24"
LISTED = f"""GPU-{UUID.upper()}, 4021
GPU-{UUID}, 4188
GPU-11111111-2222-3333-4444-555555555555, 5120
GPU-{UUID}, 6002
"""


def fake_nvidia_smi(monkeypatch, listed: str | None) -> list:
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        if listed is None:
            raise FileNotFoundError("nvidia-smi")
        return subprocess.CompletedProcess(command, 0, stdout=listed, stderr="")

    monkeypatch.setattr(contention.subprocess, "run", run)
    return calls


def test_the_processes_on_this_gpu_are_counted_by_its_uuid(monkeypatch) -> None:
    """Three processes hold a context on this GPU (this one among them), one on another GPU."""
    calls = fake_nvidia_smi(monkeypatch, LISTED)
    monkeypatch.setattr(contention, "_gpu_uuid", lambda device: UUID)
    assert contention._compute_processes(UUID) == 3
    assert OtherGPUProcesses("cuda:0").count() == 2  # the most at either end, less this process
    assert calls[0][:2] == ["nvidia-smi", "--query-compute-apps=gpu_uuid,pid"] and len(calls) == 3


@pytest.mark.parametrize("listed", [None, "", "GPU-11111111-2222-3333-4444-555555555555, 5120\n"])
def test_without_nvidia_smi_or_with_this_process_hidden_it_is_unknown(monkeypatch, listed) -> None:
    """No nvidia-smi, or a list without this GPU's processes (a container hides them; this process, timing
    on the GPU, would be listed): unknown, not none."""
    fake_nvidia_smi(monkeypatch, listed)
    monkeypatch.setattr(contention, "_gpu_uuid", lambda device: UUID)
    assert OtherGPUProcesses("cuda:0").count() is None


def test_a_cpu_bench_asks_no_gpu(monkeypatch) -> None:
    calls = fake_nvidia_smi(monkeypatch, LISTED)
    assert OtherGPUProcesses("cpu").count() is None and calls == []
