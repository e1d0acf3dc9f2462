"""The three deployable graphs, cut where every runtime can cache the support prompt.

    encoder: images (N, 3, S, S)                                  -> features (N, C, s, s)
    prompt:  features (N, C, s, s), foreground (N, 1, S, S)       -> vector (N, C), prototype (N, C)
    head:    features (B, C, s, s), vector (B, C), prototype (B, C) -> logits (B, 2, S, S)

The prompt graph works per shot; a runtime averages the k shots' vectors and prototypes, exactly as
`CRNet.prompt` does. The head unrolls the T refinement iterations and upsamples to the input size. Every
graph takes and returns FP32; an FP16 graph casts inside (see `PrecisionWrapper`).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from crnet.bundle import GRAPH_IO, GRAPHS, tensor_shapes
from crnet.config import MAX_BATCH
from crnet.errors import interrupted
from crnet.model.crnet import CRNet, SupportPrompt
from crnet.optional import require

OPSET = 18
# Elements: above every weight of r50's graphs (the largest, the neck's 3x3 conv, has 3.5M).
WEIGHT_LIMIT = 1 << 24


class EncoderGraph(nn.Module):
    def __init__(self, model: CRNet):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images)


class PromptGraph(nn.Module):
    def __init__(self, model: CRNet):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, foreground: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.shot_prompts(features, foreground)


class HeadGraph(nn.Module):
    def __init__(self, model: CRNet, iterations: int):
        super().__init__()
        self.model, self.iterations = model, iterations

    def forward(self, features: torch.Tensor, vector: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
        size = self.model.config.input_size
        prompt = SupportPrompt(vector=vector, prototype=prototype)
        # The PyTorch loop: ONNX has no crnet::refine_loop.
        return self.model.segment(features, prompt, self.iterations, output_size=(size, size), fused=False)


class PrecisionWrapper(nn.Module):
    """FP32 in and out around a graph that runs in `dtype` (the casts become part of the ONNX graph)."""

    def __init__(self, graph: nn.Module, dtype: torch.dtype):
        super().__init__()
        # A copy: converting in place would change the caller's FP32 model.
        # Not named `graph`: that attribute name collides with the exporter's fx.GraphModule.
        self.inner = graph if dtype == torch.float32 else copy.deepcopy(graph).to(dtype)
        self.dtype = dtype

    def forward(self, *inputs: torch.Tensor):
        outputs = self.inner(*(x.to(self.dtype) for x in inputs))
        if isinstance(outputs, tuple):
            return tuple(y.float() for y in outputs)
        return outputs.float()


@dataclass(frozen=True)
class GraphSpec:
    """Names and example shapes of one graph; dimension 0 of every tensor is the dynamic batch."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def example(self, model: CRNet, batch: int) -> tuple[torch.Tensor, ...]:
        """Deterministic example inputs (batch >= 2, so that the exporter keeps the batch symbolic)."""
        shapes = tensor_shapes(model.config)
        generator = torch.Generator().manual_seed(0)
        tensors = []
        for name in self.inputs:
            x = torch.randn((batch, *shapes[name]), generator=generator)
            if name == "features":
                x = x.relu()  # encoder features come out of a ReLU
            elif name == "foreground":
                x = (x > 0).float()
            elif name == "vector":
                x = torch.sigmoid(x)
            tensors.append(x)
        return tuple(tensors)


SPECS = tuple(GraphSpec(name, *GRAPH_IO[name]) for name in GRAPHS)  # the bundle contract's names


def graph_module(spec: GraphSpec, model: CRNet, iterations: int, dtype: torch.dtype) -> nn.Module:
    graph = {
        "encoder": lambda: EncoderGraph(model),
        "prompt": lambda: PromptGraph(model),
        "head": lambda: HeadGraph(model, iterations),
    }[spec.name]()
    return PrecisionWrapper(graph, dtype).eval()


def export_onnx(
    module: nn.Module,
    spec: GraphSpec,
    example: tuple[torch.Tensor, ...],
    path: Path,
    metadata: dict[str, str] | None = None,
) -> None:
    """torch.export-based ONNX export with a symbolic batch on every input and output, one file;
    `metadata` goes into the model's metadata_props."""
    optimizer = require("onnxscript.optimizer", "crnet export (the torch.export-based ONNX exporter)")
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic_shapes = (tuple({0: batch} for _ in spec.inputs),)  # forward(*inputs): one varargs entry
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter chatter about opset conversion and deprecations
        try:
            program = torch.onnx.export(
                module,
                example,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                opset_version=OPSET,
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        except Exception as error:
            if interrupted(error):  # the exporter wraps a Ctrl-C that lands in its imports as its own error
                raise KeyboardInterrupt from None
            raise
        # Weights sliced by the hoisted refinement loop become weights of their own: the exporter's folding
        # stops at 8192-element inputs, and a Slice left in front of a Conv keeps its weights from being
        # build-time constants.
        optimizer.fold_constants(program.model, input_size_limit=WEIGHT_LIMIT, output_size_limit=WEIGHT_LIMIT)
    program.model.metadata_props.update(metadata or {})
    program.save(str(path), external_data=False)
