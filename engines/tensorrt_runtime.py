"""TensorRT engines from a bundle: buffers are torch CUDA tensors, `execute_async_v3` on a CUDA stream of
the runtime's own, ordered after the caller's stream and before its later work."""

from __future__ import annotations

import contextlib

import torch

from crnet.bundle import GRAPHS, Bundle, BundleError
from crnet.engines.base import Runtime, RuntimeUnavailable, per_query
from crnet.errors import CRNetError
from crnet.model.crnet import SupportPrompt
from crnet.optional import require, tensorrt_logger


def check_engine_source(bundle: Bundle, precision: str, graph: str) -> None:
    """Bundle.check_metadata for the ONNX graph a TensorRT engine was built from (the engine carries no
    such metadata of its own); skipped where the onnx package is not installed."""
    try:
        import onnx
    except ImportError:
        return
    source = bundle.manifest["engines"][precision][graph].get("source")
    listed = [p for p, graphs in bundle.manifest["graphs"].items() if graphs[graph]["file"] == source]
    if not listed:
        return  # an engine of an older export, or built from a graph the bundle no longer lists
    path = bundle.root / source
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError, OSError: the checksums passed, so a foreign file
        raise BundleError(f"cannot read {path} as an ONNX graph: {error}") from None
    bundle.check_metadata(path, graph, listed[0], {p.key: p.value for p in model.metadata_props})


def padded_to(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` with its first row repeated until it has `rows`: an engine built for batches of at least `rows`
    (`--batch-range MIN:...` with MIN > 1) runs a smaller batch so, and the extra rows' outputs are dropped.
    A repeated row, not zeros: a zero support mask would divide by zero in the prompt."""
    if len(x) >= rows:
        return x
    return torch.cat([x, x[:1].expand(rows - len(x), *x.shape[1:])])


class EngineRunError(CRNetError):
    """TensorRT refused a shape or an address, or could not enqueue an engine."""


class Engine:
    """One deserialized engine and its execution context."""

    def __init__(self, trt, runtime, path, device: torch.device):
        self.trt = trt
        self.name = path.name
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeUnavailable(
                f"TensorRT {trt.__version__} cannot load {path}: not an engine, or built by another "
                "TensorRT version or for another GPU (re-export with --tensorrt on this machine)"
            )
        self.context = self.engine.create_execution_context()
        self.device = device
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        profiles = [self.engine.get_tensor_profile_shape(n, 0) for n in self.inputs]  # (min, opt, max) shapes
        self.min_batch = max(shapes[0][0] for shapes in profiles)
        self.max_batch = min(shapes[2][0] for shapes in profiles)

    def signature(self) -> tuple[list[tuple], list[tuple]]:
        """[(name, shape)] of the inputs and of the outputs, -1 where a dimension is dynamic."""
        shape = self.engine.get_tensor_shape
        return [(n, tuple(shape(n))) for n in self.inputs], [(n, tuple(shape(n))) for n in self.outputs]

    def __call__(self, inputs: dict[str, torch.Tensor], stream) -> dict[str, torch.Tensor]:
        """Run on `stream`, a torch.cuda.Stream of the runtime's: not torch's default (legacy) stream, on
        which TensorRT 10 adds synchronisations to each enqueue and warns every call. The stream waits for
        the caller's stream (the inputs' copies) and the caller's stream for it (the outputs)."""
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with on_device:
            caller = torch.cuda.current_stream(self.device)
            batch = len(inputs[self.inputs[0]])
            tensors = {}
            for name in self.inputs:
                x = padded_to(inputs[name].to(self.device, torch.float32), self.min_batch).contiguous()
                tensors[name] = x
                if not self.context.set_input_shape(name, tuple(x.shape)):
                    raise EngineRunError(
                        f"TensorRT refused {name} of shape {tuple(x.shape)} for {self.name} (its batches: "
                        f"{self.min_batch} to {self.max_batch})"
                    )
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                tensors[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
            for name, tensor in tensors.items():
                if not self.context.set_tensor_address(name, tensor.data_ptr()):
                    raise EngineRunError(f"TensorRT refused the address of {name} for {self.name}")
                if tensor.is_cuda:  # the allocator must not reuse it before the engine's stream is done
                    tensor.record_stream(stream)
            stream.wait_stream(caller)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise EngineRunError(f"TensorRT could not enqueue {self.name} (see TensorRT's log above)")
            caller.wait_stream(stream)
        return {name: tensors[name][:batch] for name in self.outputs}


class TensorRTRuntime(Runtime):
    name = "tensorrt"

    def __init__(self, bundle: Bundle, *, precision: str = "fp16", device: str | torch.device = "cuda"):
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeUnavailable("the tensorrt runtime needs a CUDA GPU, and torch sees none")
        trt = require("tensorrt", "the tensorrt runtime")
        self.bundle = bundle
        self.precision = precision
        self.input_size = self.bundle.model_config.input_size
        self.iterations = self.bundle.iterations
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)
            self.logger = tensorrt_logger(trt)
            self.runtime = trt.Runtime(self.logger)
            self.engines = {}
            for graph in GRAPHS:
                path = self.bundle.engine(precision, graph)
                engine = self.engines[graph] = Engine(trt, self.runtime, path, self.device)
                self.bundle.check_tensors(path, graph, *engine.signature())
                check_engine_source(self.bundle, precision, graph)
        self.max_batch = min(engine.max_batch for engine in self.engines.values())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        self.check_batch(images.shape[0])
        return self.engines["encoder"]({"images": images}, self.stream)["features"]

    def prompt_per_shot(self, features: torch.Tensor, foreground: torch.Tensor):
        self.check_open()
        self.check_batch(features.shape[0])
        outputs = self.engines["prompt"]({"features": features, "foreground": foreground}, self.stream)
        return outputs["vector"], outputs["prototype"]

    def segment(self, features: torch.Tensor, prompt: SupportPrompt) -> torch.Tensor:
        self.check_segment(features, prompt)
        self.check_batch(features.shape[0])
        vector, prototype = per_query(prompt, len(features))
        inputs = {"features": features, "vector": vector, "prototype": prototype}
        return self.engines["head"](inputs, self.stream)["logits"]

    def close(self) -> None:
        self.engines.clear()
        super().close()
