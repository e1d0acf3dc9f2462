"""A whole call captured as one CUDA graph per input signature, replayed from static buffers.

The first call with a new signature (shapes, dtypes, strides) copies its inputs into buffers of its own,
runs the function a few times off the capture (compilation, cuDNN's and Triton's choices, lazy
initialisation), then captures one call; every later call with that signature copies its inputs into those
buffers and replays the graph: one launch from the host, whatever the function launches. The graph's output
is overwritten by the next replay: each call hands back a copy of it.

Host cost per call: the input copies and the replay. torch.compile's mode="reduce-overhead" adds to its
replay dynamo's guard checks and, in CUDAGraphNode.run (torch/_inductor/cudagraph_trees.py), a check of
every static input's address and a rebuild of the output tensors.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
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
    """The capture recipe of torch.cuda.graphs: warm up on a side stream, then record one call, on a
    stream of the inputs' device. torch.cuda.graph's own capture stream is made once, on the device current
    then (cuda:0): capturing work for cuda:1 there recorded nothing, and every replay gave the first
    call's output again."""
    device = inputs[0].device
    with torch.cuda.device(device):
        caller, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                function(*inputs)
        caller.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
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
    """`function` (tensors in, one tensor out, no host synchronisation) as replays of captured graphs; each
    call returns `finish(output)`, a tensor of the caller's own (by default a copy of the graph's output,
    which the next replay overwrites). Calls from several threads, or on several CUDA streams, take their
    turns: each one's copies in, replay and copy out, before the next one's."""

    GRAPHS = 16  # signatures kept per function: each a memory pool; the least recently used goes first

    def __init__(
        self,
        function: Callable[..., torch.Tensor],
        device: torch.device,
        capture: Capture | None = None,
        finish: Callable[[torch.Tensor], torch.Tensor] = torch.clone,
    ):
        self.function, self.device, self.finish = function, torch.device(device), finish
        self.capture = capture or capture_cuda_graph
        self.graphs: OrderedDict[Signature, _Captured] = OrderedDict()
        self.turn = threading.Lock()
        self.stream = None  # the CUDA stream of the last call

    def release(self) -> None:
        """Drop every graph with its buffers and memory pool; a later call captures again."""
        with self.turn:
            self.graphs.clear()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        signature = signature_of(inputs)
        with self.turn:
            if self.device.type == "cuda":  # on another stream than the last call: after that call's work
                stream = torch.cuda.current_stream(self.device)
                if self.stream is not None and stream != self.stream:
                    stream.wait_stream(self.stream)
                self.stream = stream
            captured = self.graphs.get(signature)
            if captured is None:
                # Buffers on the runtime's device whatever the inputs': a replay never reads host memory.
                static = [torch.empty_like(t, device=self.device) for t in inputs]
                for buffer, tensor in zip(static, inputs, strict=True):
                    buffer.copy_(tensor)
                replay, output = self.capture(self.function, static)
                captured = self.graphs[signature] = _Captured(static, replay, output)
                if len(self.graphs) > self.GRAPHS:
                    self.graphs.popitem(last=False)
            else:
                self.graphs.move_to_end(signature)
                for buffer, tensor in zip(captured.inputs, inputs, strict=True):
                    buffer.copy_(tensor, non_blocking=tensor.is_cuda)  # a host tensor may change after
            captured.replay()  # also after a capture: recording a call runs none of its kernels
            return self.finish(captured.output)
