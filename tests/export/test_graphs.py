"""Exported graphs against PyTorch: values, dynamic batch, FP16 precision islands, FP32 I/O."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from crnet import checkpoint
from crnet.bundle import load_bundle
from crnet.export.graphs import SPECS, graph_module

# FP32 ONNX Runtime vs PyTorch on the same CPU differ only in summation order.
FP32_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("batch", [1, 5])
def test_fp32_graph_matches_pytorch_at_any_batch(micro_bundle, micro_checkpoint, spec, batch) -> None:
    model = checkpoint.load_model(micro_checkpoint)
    graph = load_bundle(micro_bundle).graph("fp32", spec.name)
    example = spec.example(model, batch)
    outputs = session(graph).run(None, {n: x.numpy() for n, x in zip(spec.inputs, example, strict=True)})
    with torch.no_grad():
        expected = graph_module(spec, model, 5, torch.float32)(*example)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for output, reference in zip(outputs, expected, strict=True):
        assert output.shape[0] == batch
        torch.testing.assert_close(torch.from_numpy(output), reference, **FP32_TOLERANCE)


def test_manifest_records_the_verification(micro_bundle) -> None:
    manifest = json.loads((micro_bundle / "manifest.json").read_text())
    fp32 = manifest["verification"]["fp32"]
    assert fp32["head"]["onnxruntime_vs_torch_fp32"]["logits"]["mask_agreement"] == 1.0
    assert fp32["encoder"]["onnxruntime_vs_torch_fp32"]["features"]["max_abs"] < 1e-4
    fp16 = manifest["verification"]["fp16"]["head"]["onnxruntime_vs_torch_fp32"]["logits"]
    assert 0 < fp16["max_abs"] < 0.1  # FP16 rounds, but not wildly
    assert manifest["iterations"] == 5 and manifest["batch"] == {"min": 1, "opt": 2, "max": 8}


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


@pytest.mark.parametrize("name", ["encoder", "prompt", "head"])
def test_fp16_graph_has_fp32_io_and_fp16_weights(micro_bundle, name) -> None:
    model = onnx.load(load_bundle(micro_bundle).graph("fp16", name))
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, value.name
    weights = [t for t in model.graph.initializer if len(t.dims) == 4]  # convolution kernels
    if weights:
        assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_convolution_weight_is_a_stored_constant(micro_bundle, precision) -> None:
    """The hoisted loop slices its weights; the export stores the slices, so that no Slice sits between a
    weight and its Conv (TensorRT builds with constant kernels; ONNX Runtime need not fold at load)."""
    model = onnx.load(load_bundle(micro_bundle).graph(precision, "head"))
    stored = {t.name for t in model.graph.initializer}
    convolutions = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convolutions and all(n.input[1] in stored for n in convolutions)
    assert not [n for n in model.graph.node if n.op_type == "Slice" and n.input[0] in stored]


def test_fp16_head_keeps_softmax_and_reductions_in_fp32(micro_bundle) -> None:
    model = onnx.load(load_bundle(micro_bundle).graph("fp16", "head"))
    types = elem_types(model)
    sensitive = [n for n in model.graph.node if n.op_type in ("Softmax", "ReduceMean", "ReduceSum")]
    assert any(n.op_type == "Softmax" for n in sensitive)
    for node in sensitive:
        assert types[node.input[0]] == onnx.TensorProto.FLOAT, (node.op_type, node.name)
    convolutions = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convolutions and all(types[n.input[0]] == onnx.TensorProto.FLOAT16 for n in convolutions)


def test_fp16_head_agrees_with_fp32(micro_bundle, micro_checkpoint) -> None:
    model = checkpoint.load_model(micro_checkpoint)
    spec = SPECS[2]
    example = spec.example(model, 4)
    feeds = {n: x.numpy() for n, x in zip(spec.inputs, example, strict=True)}
    bundle = load_bundle(micro_bundle)
    (fp32,) = session(bundle.graph("fp32", "head")).run(None, feeds)
    (fp16,) = session(bundle.graph("fp16", "head")).run(None, feeds)
    assert fp16.dtype == np.float32
    # FP16 keeps ~3 significant digits; logits of this untrained model are O(0.1).
    np.testing.assert_allclose(fp16, fp32, atol=2e-2)
