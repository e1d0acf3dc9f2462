"""A whole call captured as one CUDA graph per input signature, replayed from static buffers.

The first call with a new signature (shapes, dtypes, strides) copies its inputs into buffers of its own,
runs the function a few times off the capture (compilation, cuDNN's and Triton's choices, lazy
initialisation), then captures one call; every later call with that signature copies its inputs into those
buffers and replays the graph: one launch from the host, whatever the function launches. The output is the
graph's own tensor, overwritten by the next replay: callers that keep it must copy it.

Host cost per call: the input copies and the replay. torch.compile's mode="reduce-overhead" adds to its
replay dynamo's guard checks and, in CUDAGraphNode.run (torch/_inductor/cudagraph_trees.py), a check of
every static input's address and a rebuild of the output tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

Signature = tuple[tuple[tuple[int, ...], torch.dtype, tuple[int, ...]], ...]


def signature_of(inputs: tuple[torch.Tensor, ...]) -> Signature:
    """What a captured graph (or a compiled trace) is specific to: each input's shape, dtype and strides."""
    return tuple((tuple(t.shape), t.dtype, t.stride()) for t in inputs)


# capture(function, static inputs) -> (replay, output): `replay()` recomputes `output` in place from the
# static inputs' current values.
Capture = Callable[[Callable[..., torch.Tensor], list[torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def capture_cuda_graph(function, inputs: list[torch.Tensor], warmup: int = 3):
    """The capture recipe of torch.cuda.graphs: warm up on a side stream, then record one call."""
    side = torch.cuda.Stream(inputs[0].device)
    side.wait_stream(torch.cuda.current_stream(inputs[0].device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            function(*inputs)
    torch.cuda.current_stream(inputs[0].device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = function(*inputs)
    return graph.replay, output


class CaptureOnOwnThread:
    """A Capture that runs on one thread of its own, inside `within()` (a context manager entered there around
    each capture), in the caller's grad and inference modes; replays run on the caller's thread.

    What it is for: PyTorch keeps the plans cuDNN chose for its convolutions in a per-thread cache whose key
    is the convolution (shapes, strides, dtypes, alignment), not how the plan was chosen, and a cached plan
    runs whatever torch.backends.cudnn.benchmark says now (`_get_benchmark_cache`, `run_single_conv` and
    `run_fused_conv` in aten/src/ATen/native/cudnn/Conv_v8.cpp). So two runtimes in one thread with the same
    convolutions, one timing cuDNN's algorithms and one taking its heuristics' choice, would both run
    whichever chose first. Captured on a thread of its own, a runtime's graphs hold its own choices, and the
    other runtimes of the process never see them."""

    def __init__(
        self, within: Callable[[], contextlib.AbstractContextManager], capture: Capture | None = None
    ):
        self.within, self.capture = within, capture or capture_cuda_graph
        self.thread: ThreadPoolExecutor | None = None  # started by the first capture, ended by close()

    def __call__(self, function: Callable[..., torch.Tensor], inputs: list[torch.Tensor]):
        # Grad and inference modes and the current CUDA device and stream are per thread: the capture records
        # what the caller's thread would have run, after what the caller queued (the inputs' copies).
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
        cuda = bool(inputs) and inputs[0].is_cuda
        stream = torch.cuda.current_stream(inputs[0].device) if cuda else None  # None: nothing to set

        def capture():
            with (
                torch.inference_mode(inference),
                torch.set_grad_enabled(grad),
                torch.cuda.stream(stream),
                self.within(),
            ):
                return self.capture(function, inputs)

        if self.thread is None:
            self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crnet-capture")
        return self.thread.submit(capture).result()

    def close(self) -> None:
        """End the thread (with its cached cuDNN plans); a later capture starts another."""
        if self.thread is not None:
            self.thread.shutdown(wait=True)
            self.thread = None


@dataclass
class _Captured:
    inputs: list[torch.Tensor]
    replay: Callable[[], None]
    output: torch.Tensor


class CapturedCalls:
    """`function` (tensors in, one tensor out, no host synchronisation) as replays of captured graphs."""

    def __init__(
        self, function: Callable[..., torch.Tensor], device: torch.device, capture: Capture | None = None
    ):
        self.function, self.device = function, torch.device(device)
        self.capture = capture or capture_cuda_graph
        self.graphs: dict[Signature, _Captured] = {}

    def release(self) -> None:
        """Drop every graph with its buffers and memory pool; a later call captures again."""
        self.graphs.clear()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        signature = signature_of(inputs)
        captured = self.graphs.get(signature)
        if captured is None:
            # Buffers on the runtime's device whatever the inputs' device: a replay never reads host memory.
            static = [torch.empty_like(t, device=self.device) for t in inputs]
            for buffer, tensor in zip(static, inputs, strict=True):
                buffer.copy_(tensor)
            replay, output = self.capture(self.function, static)
            captured = self.graphs[signature] = _Captured(static, replay, output)
        else:
            for buffer, tensor in zip(captured.inputs, inputs, strict=True):
                buffer.copy_(tensor, non_blocking=True)
        captured.replay()  # also after a capture: recording a call runs none of its kernels
        return captured.output
