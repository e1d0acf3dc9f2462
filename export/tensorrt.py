"""TensorRT engines from the bundle's ONNX graphs (TensorRT 10 and 11 Python APIs).

FP16: TensorRT 10 builds the FP32 graph with the FP16 builder flag (weak typing: TensorRT picks per layer).
TensorRT 11 removed weak typing, so it builds the FP16 ONNX graph as a strongly typed network: the graph's
own casts decide precision, keeping softmax and the pooling reductions in FP32 as exported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from crnet.bundle import BatchRange
from crnet.errors import CRNetError
from crnet.export.writer import file_entry
from crnet.files import write_bytes
from crnet.optional import require, tensorrt_logger

DEFAULT_TIMING_CACHE = Path.home() / ".cache" / "crnet" / "tensorrt"


class EngineBuildError(CRNetError):
    """TensorRT could not parse a graph or build an engine."""


class TensorRTUnavailable(CRNetError):
    """TensorRT is installed but this machine cannot build engines (no CUDA GPU)."""


def major_version(trt) -> int:
    return int(trt.__version__.split(".")[0])


def fp16_source(trt) -> str:
    """Which ONNX graph an FP16 engine is built from on this TensorRT: 'fp32' + flag, or 'fp16' typed."""
    weak_typing = major_version(trt) < 11 and hasattr(trt.BuilderFlag, "FP16")
    return "fp32" if weak_typing else "fp16"


def builder_here(why: str = "--tensorrt"):
    """(the tensorrt module, the GPU's name) where this machine can build engines: the package with its
    builder (not a runtime-only install) and a CUDA GPU. Commands call it before any work."""
    trt = require("tensorrt", why)
    if not hasattr(trt, "Builder"):
        raise TensorRTUnavailable(
            f"{why}: tensorrt {getattr(trt, '__version__', '?')} here has no builder (a runtime-only "
            "install); install the full tensorrt package"
        )
    device = cuda_device_name()
    if device is None:
        raise TensorRTUnavailable(f"{why} needs a CUDA GPU, and torch sees none")
    return trt, device


def load_timing_cache(trt, config, path: Path, given: bool) -> None:
    """Attach the timing cache at `path` (a new one where there is no file) to the builder `config`. A file
    TensorRT cannot read, or one timed by another TensorRT or GPU, is refused where the user named it (the
    build would replace it) and started afresh where it is crnet's own (`given` False)."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # TensorRT's own error classes; None is its other way of refusing
        cache = None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    if given:
        raise EngineBuildError(
            f"--timing-cache {path} is not a timing cache of TensorRT {trt.__version__} on this GPU, and "
            "the build would replace it; give a new file name"
        )
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def check_timing_cache(path: Path) -> None:
    """Before the export: a --timing-cache file already there is one this TensorRT reads."""
    if not path.is_file():
        return
    trt, _ = builder_here()
    builder = trt.Builder(tensorrt_logger(trt))
    load_timing_cache(trt, builder.create_builder_config(), path, given=True)


def build_engine(
    trt,
    onnx_path: Path,
    engine_path: Path,
    *,
    fp16_flag: bool,
    batch: BatchRange,
    workspace_bytes: int,
    timing_cache: Path,
    cache_given: bool = True,
) -> None:
    logger = tensorrt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if not fp16_flag and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # Required for typed FP16 graphs on 10.x, the only mode on 11.x; the FP16 flag needs weak typing.
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]  # dimension 0 is the dynamic batch (-1)
        profile.set_shape(tensor.name, (batch.min, *rest), (batch.opt, *rest), (batch.max, *rest))
    config.add_optimization_profile(profile)

    load_timing_cache(trt, config, timing_cache, cache_given)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)"
        )
    engine_path.write_bytes(memoryview(serialized))  # inside the staged bundle
    write_bytes(timing_cache, memoryview(config.get_timing_cache().serialize()))


def cuda_device_name() -> str | None:
    """The GPU engines are built for (they run on that model of GPU only); None without CUDA."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def build_engines(
    root: Path,
    manifest: dict,
    *,
    fp16: bool,
    batch: BatchRange,
    workspace_bytes: int,
    timing_cache: Path | None,
    progress: Callable[[str], None],
) -> dict:
    """Engines for every graph, FP32 and (with fp16) FP16; returns the manifest's `engines` section."""
    trt, device = builder_here()
    given = timing_cache is not None
    if timing_cache is None:
        timing_cache = DEFAULT_TIMING_CACHE / f"timing-{trt.__version__}-{device.replace(' ', '_')}.cache"
    timing_cache = Path(os.path.realpath(timing_cache))  # through a link: the file it names is updated
    engines = {}
    for precision in ("fp32", "fp16") if fp16 else ("fp32",):
        source = "fp32" if precision == "fp32" else fp16_source(trt)
        engines[precision] = {}
        for name, entry in manifest["graphs"][source].items():
            progress(f"building TensorRT {precision} engine for {name}")
            path = root / f"{name}.{precision}.plan"
            build_engine(
                trt,
                root / entry["file"],
                path,
                fp16_flag=precision == "fp16" and source == "fp32",
                batch=batch,
                workspace_bytes=workspace_bytes,
                timing_cache=timing_cache,
                cache_given=given,
            )
            engines[precision][name] = file_entry(
                root, path, source=entry["file"], tensorrt_version=trt.__version__, device=device
            )
    return engines
