"""`crnet export`: checkpoint -> bundle (ONNX graphs, optional FP16 graphs and TensorRT engines).

Every ONNX graph passes `onnx.checker` (full check, with shape inference) and is run by ONNX Runtime on
deterministic inputs against the PyTorch FP32 model before the bundle is committed; the errors go into the
manifest. An FP32 graph that disagrees beyond the tolerance below fails the export.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from crnet import checkpoint
from crnet.bundle import BatchRange, graph_metadata
from crnet.errors import CRNetError
from crnet.export.graphs import OPSET, SPECS, GraphSpec, export_onnx, graph_module
from crnet.export.writer import BundleWriter, base_manifest, file_entry
from crnet.files import explain
from crnet.metrics import output_errors
from crnet.optional import MissingDependencyError, require

# How far ONNX Runtime may be from PyTorch's FP32 model, relative to the output's scale (at least 1). FP32
# graphs differ from it only in the order of summation, so anything past 1e-3 is an export bug. FP16 graphs
# round every activation (the tiny model's FP16 logits were 0.045 off at most, docs/BENCHMARKS.md): their
# gate catches an overflow or a broken graph, not rounding.
RELATIVE_TOLERANCE = {"fp32": 1e-3, "fp16": 0.1}
VERIFY_BATCH = 3  # not the export example's 2: checks that the batch dimension really is dynamic

Progress = Callable[[str], None]


class ExportVerificationError(CRNetError):
    """ONNX Runtime disagrees with PyTorch on an exported graph beyond its precision's tolerance."""


@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    tensorrt_skipped: str | None  # why no engines were built, when --tensorrt was asked for


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs a warning per missing torchvision op; none of them concerns this model."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def verify_graph(path: Path, spec: GraphSpec, model, iterations: int, threads: int) -> dict:
    """Run the ONNX graph with ONNX Runtime (CPU) against the PyTorch FP32 model."""
    ort = require("onnxruntime", "checking the exported graphs")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own classes: an old release refuses the IR version
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportVerificationError(
            f"ONNX Runtime {ort.__version__} cannot load the exported {spec.name} graph to check it "
            f"({first}); crnet's graphs need onnxruntime >= 1.18"
        ) from None
    example = spec.example(model, VERIFY_BATCH)
    outputs = session.run(None, {name: x.numpy() for name, x in zip(spec.inputs, example, strict=True)})
    with torch.no_grad():
        reference = graph_module(spec, model, iterations, torch.float32)(*example)
    reference = reference if isinstance(reference, tuple) else (reference,)
    return output_errors(spec.outputs, outputs, reference)


def export_bundle(
    checkpoint_path: str | Path,
    out: str | Path,
    *,
    fp16: bool = False,
    tensorrt: bool = False,
    batch: BatchRange = BatchRange(),
    iterations: int | None = None,
    overwrite: bool = False,
    workspace_gib: float = 4.0,
    timing_cache: Path | None = None,
    threads: int = 2,
    progress: Progress = lambda message: None,
) -> ExportResult:
    """Write a bundle directory; see the module docstring and crnet/bundle.py for its layout."""
    onnx = require("onnx", "crnet export")
    require("onnxscript", "crnet export (the torch.export-based ONNX exporter)")
    require("onnxruntime", "crnet export (checks every graph against PyTorch)")
    checkpoint_path = Path(checkpoint_path)
    model = checkpoint.load_model(checkpoint_path).eval()
    config = model.config
    iterations = config.refinement_iterations(iterations)

    writer = BundleWriter(Path(out), overwrite=overwrite, inputs=(checkpoint_path,))
    try:
        manifest = base_manifest(config, iterations, batch, OPSET, checkpoint_path)
        precisions = {"fp32": torch.float32} | ({"fp16": torch.float16} if fp16 else {})
        for precision, dtype in precisions.items():
            manifest["graphs"][precision] = {}
            manifest["verification"][precision] = {}
            for spec in SPECS:
                progress(f"exporting {spec.name} ({precision})")
                path = writer.root / f"{spec.name}.{precision}.onnx"
                module = graph_module(spec, model, iterations, dtype)
                with _quiet_exporter():
                    source = manifest["checkpoint"]["sha256"]
                    metadata = graph_metadata(spec.name, precision, iterations, source)
                    export_onnx(module, spec, spec.example(model, 2), path, metadata)
                onnx.checker.check_model(str(path), full_check=True)
                errors = verify_graph(path, spec, model, iterations, threads)
                _check_agreement(spec, precision, errors)
                manifest["verification"][precision][spec.name] = {"onnxruntime_vs_torch_fp32": errors}
                manifest["graphs"][precision][spec.name] = file_entry(
                    writer.root, path, inputs=list(spec.inputs), outputs=list(spec.outputs), dtype=precision
                )

        skipped = None
        if tensorrt:
            from crnet.export.tensorrt import TensorRTUnavailable, build_engines

            try:
                manifest["engines"] = build_engines(
                    writer.root,
                    manifest,
                    fp16=fp16,
                    batch=batch,
                    workspace_bytes=int(workspace_gib * (1 << 30)),
                    timing_cache=timing_cache,
                    progress=progress,
                )
            except (MissingDependencyError, TensorRTUnavailable) as error:
                skipped = str(error)
        bundle = writer.commit(manifest)
    except OSError as error:
        writer.abort()
        raise explain(error, out) from None
    except BaseException:
        writer.abort()
        raise
    return ExportResult(bundle=bundle, tensorrt_skipped=skipped)


def _check_agreement(spec: GraphSpec, precision: str, errors: dict) -> None:
    for name, figures in errors.items():
        limit = RELATIVE_TOLERANCE[precision] * max(1.0, figures["reference_max_abs"])
        if not figures["max_abs"] <= limit:  # NaN fails too
            raise ExportVerificationError(
                f"ONNX Runtime disagrees with PyTorch on the {precision} {spec.name}/{name}: max abs error "
                f"{figures['max_abs']:.3g}, more than {limit:.3g}"
            )
