"""Timing one call: wall time with the device synchronised before start and stop, and on a GPU also the GPU
time between CUDA events around it. Shared by `crnet bench`, the FLOP floor's matmul rate, bench_ops and the
scripts in benchmarks/."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class Timer:
    """Wall time of a callable, the device synchronised before start and before stop; on a GPU also its
    GPU time, between CUDA events recorded on the current stream around it (None on a CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        # `device`'s, not the current device's: with cuda:1 those synchronised and timed an idle GPU
        self.sync = (lambda: torch.cuda.synchronize(device)) if self.cuda else (lambda: None)
        if self.cuda:
            with torch.cuda.device(device):
                self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))

    def __call__(self, work: Callable[[], object]) -> tuple[float, float | None]:
        self.sync()
        start = time.perf_counter()
        if self.cuda:
            self.events[0].record(torch.cuda.current_stream(self.device))
        work()
        if self.cuda:
            self.events[1].record(torch.cuda.current_stream(self.device))
        self.sync()
        wall = time.perf_counter() - start
        gpu = self.events[0].elapsed_time(self.events[1]) / 1000.0 if self.cuda else None
        return wall, gpu


def medians_in_turns(
    calls: dict[str, Callable[[], object]], timer: Timer, repeats: int, *, gpu: bool = False
) -> dict[str, float]:
    """Median milliseconds of each call, timed in turns (call by call, so that all see the same machine
    state); with `gpu`, GPU time where the timer has it. Warm-up is the caller's."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            wall, gpu_time = timer(call)
            times[name].append(1000 * (gpu_time if gpu and gpu_time is not None else wall))
    return {name: statistics.median(values) for name, values in times.items()}
