"""crnet.engines: one runtime per backend (torch, ONNX Runtime, TensorRT) behind one interface.

    runtime = open_runtime("onnxruntime:fp16", bundle="runs/bundle", device="cpu")
    features = runtime.encode(images); prompt = runtime.prompt(features, masks); runtime.segment(...)

A spec is NAME[:PRECISION][+OPTION...]: `torch:fp16+channels-last+compile`, `torch:bf16+channels-last`,
`torch:fp16+cuda-graphs` (each episode shape one captured CUDA graph), `torch:fp16+compile+cuda-graphs`
(inductor's code, captured), `+cudnn-epilogues` (bias, residual and ReLU inside cuDNN's convolutions),
`+space-to-depth` (the stem's strided 7x7 convolution as a 4x4 one over 2x2 pixel blocks), `+bare-neck`
(the encoder's neck as two bare convolutions, their sum, bias and ReLU one pass), `+split-neck` (the
same with each convolution in pieces of at most 512 input channels), `+grouped-neck` (layer3's pieces as
one grouped convolution, no slice copies), `+chunked-neck` (the neck on chunks of at most 16 images),
`+banded-aspp`
(the dilated ASPP branches without the taps that read only padding), `+concurrent-aspp` (the ASPP's
branches on CUDA streams of their own, side by side), `+triton-head` (the head's 3x3
convolutions and the ASPP's branches as Triton kernels of ours, ReLUs and residual adds inside, and each
iteration's pooling term, projection, classifier and softmax in two),
`+triton-encoder` (the same for the encoder's size-keeping 1x1 and 3x3 convolutions and its
neck),
`+cudnn-benchmark` (with
`+cuda-graphs`: cuDNN times its algorithms for each convolution it captures), `+max-autotune` (with
`+compile`: inductor times its Triton templates against cuBLAS and cuDNN for each matrix product and
convolution, in the compiled graph, epilogues fused), `+torch-loop` (PyTorch's
refinement loop, not the native op, whatever --fused says), `torch:fp16+anchor`
(plain torch.compile, the anchor of GPU benches), `onnxruntime:fp32`, `onnxruntime:fp16+cuda`,
`onnxruntime:fp16+tensorrt` (execution providers), `tensorrt:fp16`; every command that takes `--runtime`
takes this syntax. Every backend library is imported only when its runtime is opened.
"""

from __future__ import annotations

if __name__ != "crnet.engines":  # one module identity: `engines` and `crnet.engines` would be two
    raise ImportError(f"this package installs as crnet.engines: import that, not {__name__}")

from dataclasses import dataclass
from pathlib import Path

import torch

from crnet.bundle import Bundle, load_bundle
from crnet.engines.base import Runtime, RuntimeUnavailable
from crnet.errors import CRNetError

NAMES = ("torch", "onnxruntime", "tensorrt")
# The deployed GPU path of a checkpoint: what infer, bench and demo run by default on CUDA. PyTorch's loop,
# not the native op (under graph replay the two tie), compiled, with cuDNN's fused epilogues and the stem over
# 2x2 pixel blocks: the fastest row at batch 64 in every H200 run of 2026-11-26, and at batch 1 in all but
# the third (where `+concurrent-aspp` was 0.03 ms faster, inside the spread, and 9% slower at batch 64); in
# the fifth, 1.29 ms (1.43x the anchor) and 2507 episodes/s (1.26x); in the sixth (2026-11-27), 1.38 ms
# (1.54x) and 2499/s (1.28x), where no candidate won at both batch sizes; in the eighth, 1.36 ms (1.47x) and
# 2503/s (1.26x), the same (docs/BENCHMARKS.md).
DEPLOYED_GPU = "torch:fp16+channels-last+cudnn-epilogues+space-to-depth+compile+cuda-graphs+torch-loop"
# Options that run kernels of a package crnet does not require: the default must run without it.
OPTIONAL_PACKAGES = {"triton-head": "triton", "triton-encoder": "triton"}
OPTIONS = {
    "torch": (
        "compile",
        "cuda-graphs",
        "channels-last",
        "cudnn-epilogues",
        "space-to-depth",
        "bare-neck",
        "split-neck",
        "grouped-neck",
        "chunked-neck",
        "banded-aspp",
        "concurrent-aspp",
        "triton-head",
        "triton-encoder",
        "cudnn-benchmark",
        "max-autotune",
        "torch-loop",
        "anchor",
    ),
    "onnxruntime": ("cuda", "tensorrt"),
    "tensorrt": (),
}

__all__ = [
    "DEPLOYED_GPU",
    "deployed_gpu",
    "NAMES",
    "Runtime",
    "RuntimeSpec",
    "RuntimeUnavailable",
    "open_runtime",
    "runtime_device",
    "torch_options",
]


@dataclass(frozen=True, eq=False)
class RuntimeSpec:
    """A runtime and its options; the same options in another order are the same runtime (equal, one hash),
    while str() keeps the order they were written in."""

    name: str
    precision: str = "fp32"
    options: tuple[str, ...] = ()

    def _identity(self) -> tuple:
        return self.name, self.precision, frozenset(self.options)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RuntimeSpec) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    @classmethod
    def parse(cls, text: str, defaults: dict[str, str] | None = None) -> RuntimeSpec:
        """NAME[:PRECISION][+OPTION...]; without a precision, `defaults[NAME]`, else fp16 for tensorrt
        (engines are deployed in FP16) and fp32 for the others."""
        head, *options = text.strip().split("+")
        name, colon, precision = head.partition(":")
        if name not in NAMES:
            raise RuntimeUnavailable(f"unknown runtime {name!r} in {text!r}; choose {', '.join(NAMES)}")
        if colon and not precision:
            raise RuntimeUnavailable(f"{text!r} has a ':' but no precision after it")
        precision = precision or (defaults or {}).get(name, "fp16" if name == "tensorrt" else "fp32")
        allowed = ("fp32", "fp16", "bf16") if name == "torch" else ("fp32", "fp16")
        if precision not in allowed:
            raise RuntimeUnavailable(f"{name} precision in {text!r} must be one of {', '.join(allowed)}")
        twice = [o for o in options if options.count(o) > 1]
        if twice:
            raise RuntimeUnavailable(f"{text!r} names the option {twice[0]!r} twice")
        unknown = [o for o in options if o not in OPTIONS[name]]
        if unknown:
            allowed = ", ".join(OPTIONS[name]) or "none"
            raise RuntimeUnavailable(f"{name} has no option {unknown[0]!r} (options: {allowed})")
        if {"cuda", "tensorrt"} <= set(options):  # one session, one provider chain
            raise RuntimeUnavailable(
                f"{text!r}: give one execution provider, +cuda or +tensorrt (TensorRT's falls back to CUDA's)"
            )
        if "anchor" in options and len(options) > 1:
            raise RuntimeUnavailable(f"{text!r}: the anchor is plain torch.compile and takes no other option")
        return cls(name, precision, tuple(options))

    def __str__(self) -> str:
        return "+".join([f"{self.name}:{self.precision}", *self.options])


def deployed_gpu() -> str:
    """The deployed GPU path as this machine can run it: DEPLOYED_GPU without the options whose package
    (OPTIONAL_PACKAGES) is not installed, so that the default of infer, bench and demo never fails for it."""
    import importlib.util

    spec = RuntimeSpec.parse(DEPLOYED_GPU)
    kept = [
        o for o in spec.options if importlib.util.find_spec(OPTIONAL_PACKAGES.get(o, "torch")) is not None
    ]
    return str(RuntimeSpec(spec.name, spec.precision, tuple(kept)))


def torch_options(spec: RuntimeSpec, fused: bool | None = None) -> dict:
    """TorchRuntime's keyword arguments for a torch spec (`fused` the default use of the native op, which
    `+torch-loop` turns off)."""
    return {
        "precision": spec.precision,
        "compile": "compile" in spec.options,
        "cuda_graphs": "cuda-graphs" in spec.options,
        "channels_last": "channels-last" in spec.options,
        "fused": False if "torch-loop" in spec.options else fused,
        "anchor": "anchor" in spec.options,
        "cudnn_epilogues": "cudnn-epilogues" in spec.options,
        "space_to_depth": "space-to-depth" in spec.options,
        "bare_neck": "bare-neck" in spec.options,
        "split_neck": "split-neck" in spec.options,
        "grouped_neck": "grouped-neck" in spec.options,
        "chunked_neck": "chunked-neck" in spec.options,
        "banded_aspp": "banded-aspp" in spec.options,
        "concurrent_aspp": "concurrent-aspp" in spec.options,
        "triton_head": "triton-head" in spec.options,
        "triton_encoder": "triton-encoder" in spec.options,
        "cudnn_benchmark": "cudnn-benchmark" in spec.options,
        "max_autotune": "max-autotune" in spec.options,
    }


def runtime_device(spec: RuntimeSpec, requested: torch.device | None) -> torch.device:
    """The device a runtime spec runs on: the one asked for, else ('auto') CUDA where the runtime can use
    it. ONNX Runtime's CPU build, the usual `pip install onnxruntime`, runs on the CPU of a GPU machine
    rather than refuse; a provider named in the spec (+cuda, +tensorrt) still asks for the GPU."""
    if requested is not None:
        return requested
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if spec.name == "onnxruntime" and not set(spec.options) & {"cuda", "tensorrt"}:
        try:
            import onnxruntime
        except ImportError:
            return torch.device("cpu")  # the runtime says itself that it is missing
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return torch.device("cpu")
    return torch.device("cuda")


def open_runtime(
    spec: RuntimeSpec | str,
    *,
    checkpoint: str | Path | None = None,
    bundle: Bundle | str | Path | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    iterations: int | None = None,
    fused: bool | None = None,
) -> Runtime:
    """Open the runtime a spec names ("onnxruntime:fp16", or a RuntimeSpec): torch reads the checkpoint,
    the others run a bundle (a folder `crnet export` wrote, or load_bundle's Bundle) at the T it was
    exported with. `iterations` sets the torch runtime's T, by default the model's (for a bundle it must be
    the bundle's); `fused` the torch runtime's use of the native refinement op, by default on where the
    library is built. On a CPU, crnet.device.flush_denormals_for_inference(device) first spares the slow
    path of denormal floats (the commands call it; it changes this process's float mode)."""
    if isinstance(spec, str):
        spec = RuntimeSpec.parse(spec)
    if spec.name == "torch":
        if checkpoint is None:
            raise RuntimeUnavailable("the torch runtime needs a checkpoint (.pt)")
        from crnet.engines.torch_runtime import TorchRuntime

        return TorchRuntime(checkpoint, device=device, iterations=iterations, **torch_options(spec, fused))
    if bundle is None:
        raise RuntimeUnavailable(f"the {spec.name} runtime needs an exported bundle (crnet export)")
    # a bundle's folder: one graph's file would name one precision, and the spec another
    if isinstance(bundle, str | Path):
        if not Path(bundle).is_dir():
            raise CRNetError(
                f"bundle={str(bundle)!r}: give the bundle's folder (crnet export --out), not a file"
            )
        bundle = load_bundle(bundle)
    if iterations is not None and iterations != bundle.iterations:  # the graphs unroll their T
        raise CRNetError(
            f"the bundle runs T = {bundle.iterations} refinement iterations, asked for {iterations}: export "
            f"it again with --iterations {iterations}"
        )
    if spec.name == "onnxruntime":
        from crnet.engines.onnxruntime_runtime import OnnxRuntime

        provider = next((o for o in spec.options if o in ("cuda", "tensorrt")), None)
        return OnnxRuntime(
            bundle, precision=spec.precision, device=device, provider=provider, threads=threads
        )
    from crnet.engines.tensorrt_runtime import TensorRTRuntime

    return TensorRTRuntime(bundle, precision=spec.precision, device=device)
