"""The TensorRT runtime's engine calls, against a recording stand-in for TensorRT's Python API (the real one
runs where TensorRT and a GPU are: tests/export/test_tensorrt.py)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from crnet.engines import tensorrt_runtime
from crnet.engines.tensorrt_runtime import Engine, EngineRunError, padded_to

INPUT, OUTPUT = "INPUT", "OUTPUT"


class Stream:
    """A stand-in for torch.cuda.Stream that records the streams it waits for and is waited for by."""

    def __init__(self, handle: int, log: list):
        self.cuda_stream, self.log = handle, log

    def wait_stream(self, other) -> None:
        self.log.append(("wait", self.cuda_stream, other.cuda_stream))


def stand_in(smallest: int, largest: int, refuse: str = ""):
    """A one-input, one-output engine (x -> y, 4 values a row) built for batches smallest..largest; its
    context records the shapes it is given and the stream it runs on, and returns False from the call
    named in `refuse`, as TensorRT does."""
    trt = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT=INPUT, OUTPUT=OUTPUT))
    shapes: dict[str, tuple] = {}

    class Context:
        def set_input_shape(self, name, shape):
            shapes[name] = shape
            return refuse != "shape" and smallest <= shape[0] <= largest

        def get_tensor_shape(self, name):
            return (shapes["x"][0], 4)

        def set_tensor_address(self, name, address):
            return refuse != "address"

        def execute_async_v3(self, stream):
            shapes["stream"] = stream
            return refuse != "execute"

    engine = types.SimpleNamespace(
        num_io_tensors=2,
        get_tensor_name=lambda i: ("x", "y")[i],
        get_tensor_mode=lambda name: INPUT if name == "x" else OUTPUT,
        get_tensor_profile_shape=lambda name, profile: ((smallest, 4), (smallest, 4), (largest, 4)),
        create_execution_context=Context,
    )
    runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda data: engine)
    return trt, runtime, shapes


def test_padded_to_repeats_the_first_row() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(padded_to(x, 4), torch.tensor([[0, 1, 2], [3, 4, 5], [0, 1, 2], [0, 1, 2.0]]))
    assert padded_to(x, 2) is x and padded_to(x, 1) is x


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_a_batch_below_the_engines_smallest_is_padded_and_cut_back(
    tmp_path: Path, monkeypatch, batch
) -> None:
    """Engines exported with --batch-range MIN:OPT:MAX, MIN > 1, failed inside TensorRT for a smaller batch:
    infer's last chunk of queries, a single support image."""
    trt, runtime, shapes = stand_in(smallest=4, largest=8)
    log: list = []
    monkeypatch.setattr(tensorrt_runtime.torch.cuda, "current_stream", lambda device: Stream(0, log))
    (tmp_path / "x.plan").write_bytes(b"plan")
    engine = Engine(trt, runtime, tmp_path / "x.plan", torch.device("cpu"))
    assert (engine.min_batch, engine.max_batch) == (4, 8)
    outputs = engine({"x": torch.ones(batch, 4)}, Stream(7, log))
    assert shapes["x"][0] == max(batch, 4) and outputs["y"].shape == (batch, 4)
    # on the runtime's own stream, not the default one (TensorRT 10 synchronises there and warns each call),
    # after the caller's work and before the caller's next
    assert shapes["stream"] == 7 and log == [("wait", 7, 0), ("wait", 0, 7)]


@pytest.mark.parametrize(
    ("refuse", "message"),
    [
        ("shape", "refused x of shape \\(2, 4\\) for x.plan \\(its batches: 1 to 8\\)"),
        ("address", "refused the address of x for x.plan"),
        ("execute", "could not enqueue x.plan"),
    ],
)
def test_what_tensorrt_refuses_is_one_error(tmp_path: Path, monkeypatch, refuse, message) -> None:
    """Its False returns were ignored (shapes, addresses) or raised a bare RuntimeError (execute)."""
    trt, runtime, _ = stand_in(smallest=1, largest=8, refuse=refuse)
    monkeypatch.setattr(tensorrt_runtime.torch.cuda, "current_stream", lambda device: Stream(0, []))
    (tmp_path / "x.plan").write_bytes(b"plan")
    engine = Engine(trt, runtime, tmp_path / "x.plan", torch.device("cpu"))
    with pytest.raises(EngineRunError, match=message):
        engine({"x": torch.ones(2, 4)}, Stream(7, []))
