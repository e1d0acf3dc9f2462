"""Timing one call: wall time with the device synchronised before start and stop, and on a GPU also the GPU
time between CUDA events around it. Shared by `crnet bench`, the FLOP floor's matmul rate and bench_ops."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class Timer:
    """Wall time of a callable, the device synchronised before start and before stop; on a GPU also its
    GPU time, between CUDA events recorded on the current stream around it (None on a CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        if self.cuda:
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))

    def __call__(self, work: Callable[[], object]) -> tuple[float, float | None]:
        self.sync()
        start = time.perf_counter()
        if self.cuda:
            self.events[0].record()
        work()
        if self.cuda:
            self.events[1].record()
        self.sync()
        wall = time.perf_counter() - start
        gpu = self.events[0].elapsed_time(self.events[1]) / 1000.0 if self.cuda else None
        return wall, gpu
