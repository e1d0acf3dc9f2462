"""The TensorRT runtime's engine calls, against a recording stand-in for TensorRT's Python API (the real one
runs where TensorRT and a GPU are: tests/export/test_tensorrt.py)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from crnet.engines import tensorrt_runtime
from crnet.engines.tensorrt_runtime import Engine, padded_to

INPUT, OUTPUT = "INPUT", "OUTPUT"


def stand_in(smallest: int, largest: int):
    """A one-input, one-output engine (x -> y, 4 values a row) built for batches smallest..largest; its
    context records the shapes it is given."""
    trt = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT=INPUT, OUTPUT=OUTPUT))
    shapes: dict[str, tuple] = {}

    class Context:
        def set_input_shape(self, name, shape):
            assert smallest <= shape[0] <= largest, f"TensorRT refuses batch {shape[0]}"
            shapes[name] = shape
            return True

        def get_tensor_shape(self, name):
            return (shapes["x"][0], 4)

        def set_tensor_address(self, name, address):
            pass

        def execute_async_v3(self, stream):
            return True

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
    monkeypatch.setattr(
        tensorrt_runtime.torch.cuda, "current_stream", lambda device: types.SimpleNamespace(cuda_stream=0)
    )
    (tmp_path / "x.plan").write_bytes(b"plan")
    engine = Engine(trt, runtime, tmp_path / "x.plan", torch.device("cpu"))
    assert (engine.min_batch, engine.max_batch) == (4, 8)
    outputs = engine({"x": torch.ones(batch, 4)})
    assert shapes["x"][0] == max(batch, 4) and outputs["y"].shape == (batch, 4)
