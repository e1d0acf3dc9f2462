"""`crnet infer`: k labelled supports, many queries; the support prompt is computed once.

Writes, per query, `<name>_mask.png` (0 = background, 1 = object, at the query's own size) and
`<name>_overlay.png`, plus `infer.json` with the settings and per-query foreground share.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crnet.data.episodes import to_model_input
from crnet.data.masks import read_binary_mask
from crnet.data.pascal import read_image
from crnet.errors import CRNetError, EmptySupportMaskError, NoSupportError
from crnet.model.crnet import SupportPrompt, upsample
from crnet.visualize import overlay
from engines import RuntimeSpec, open_runtime
from engines.base import Runtime
from export.bundle import load_bundle


@dataclass(frozen=True)
class EngineChoice:
    spec: RuntimeSpec
    checkpoint: Path | None
    bundle: Path | None


def choose_engine(
    path: Path, runtime: str | None, precision: str | None, device: torch.device
) -> EngineChoice:
    """What `--engine` names: a checkpoint (torch), a bundle, or a graph/engine file inside a bundle."""
    if not path.exists():
        raise CRNetError(f"engine not found: {path}")
    if path.is_file() and path.suffix == ".pt":
        if runtime not in (None, "torch"):
            raise CRNetError(f"{path} is a checkpoint: it runs on the torch runtime, not {runtime}")
        return EngineChoice(RuntimeSpec("torch", precision or "fp32"), path, None)
    bundle = load_bundle(path)  # BundleError for foreign files and directories
    if path.is_file():  # a graph or engine inside the bundle fixes runtime and precision
        implied = {".onnx": "onnxruntime", ".plan": "tensorrt"}.get(path.suffix)
        if implied is None:
            raise CRNetError(f"{path} is neither a .pt checkpoint, an .onnx graph nor a .plan engine")
        runtime, precision = runtime or implied, precision or path.stem.rsplit(".", 1)[-1]
    if runtime is None:
        has_engines = (precision or "fp16") in bundle.manifest.get("engines", {})
        runtime = "tensorrt" if device.type == "cuda" and has_engines else "onnxruntime"
    if precision is None:
        precision = "fp16" if runtime == "tensorrt" else "fp32"
    options = ("cuda",) if runtime == "onnxruntime" and device.type == "cuda" else ()
    return EngineChoice(RuntimeSpec.parse("+".join([f"{runtime}:{precision}", *options])), None, bundle.root)


def load_support(image_path: Path, mask_path: Path, size: int):
    image = read_image(image_path)
    mask = read_binary_mask(mask_path, image.shape[:2])
    tensor, resized = to_model_input(image, mask, size)
    if not (resized == 1).any():
        raise EmptySupportMaskError(
            f"support mask {mask_path} marks too few pixels: its object vanishes at the {size}x{size} input"
        )
    return tensor, resized


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write-then-rename: an interrupted run never leaves a truncated picture under the final name."""
    temporary = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(temporary, format="PNG")
    os.replace(temporary, path)


def output_names(queries: list[Path]) -> list[str]:
    """Query file stems, made unique (two queries may share a name in different folders)."""
    seen: dict[str, int] = {}
    names = []
    for query in queries:
        count = seen.get(query.stem, 0)
        seen[query.stem] = count + 1
        names.append(query.stem if count == 0 else f"{query.stem}_{count}")
    return names


def infer(
    engine: Path,
    supports: list[Path],
    support_masks: list[Path],
    queries: list[Path],
    out: Path,
    *,
    runtime: str | None = None,
    precision: str | None = None,
    device: torch.device = torch.device("cpu"),
    batch: int = 8,
    progress=lambda n: None,
) -> dict:
    if not supports:
        raise NoSupportError("give at least one --support image with its --support-mask")
    if len(supports) != len(support_masks):
        raise CRNetError(f"{len(supports)} --support images but {len(support_masks)} --support-mask files")
    if not queries:
        raise CRNetError("give at least one --query image")
    if batch < 1:
        raise CRNetError(f"--batch must be >= 1, got {batch}")
    choice = choose_engine(engine, runtime, precision, device)
    runner: Runtime = open_runtime(
        choice.spec, checkpoint=choice.checkpoint, bundle=choice.bundle, device=device
    )
    try:
        size = runner.input_size
        # Every input is read and checked before anything is computed or written.
        loaded = [load_support(i, m, size) for i, m in zip(supports, support_masks, strict=True)]
        query_images = [read_image(q) for q in queries]
        out.mkdir(parents=True, exist_ok=True)
        runner.check_batch(len(loaded))
        images = torch.stack([t for t, _ in loaded]).to(device)
        masks = torch.stack([m for _, m in loaded]).to(device)
        started = time.perf_counter()
        prompt = runner.prompt(runner.encode(images).unsqueeze(0), masks.unsqueeze(0))
        if runner.max_batch is not None:
            batch = min(batch, runner.max_batch)
        records = []
        names = output_names(queries)
        for start in range(0, len(queries), batch):
            chunk = query_images[start : start + batch]
            tensors = torch.stack([to_model_input(image, None, size)[0] for image in chunk]).to(device)
            expanded = SupportPrompt(
                vector=prompt.vector.expand(len(chunk), -1), prototype=prompt.prototype.expand(len(chunk), -1)
            )
            logits = runner.segment(runner.encode(tensors), expanded).float().cpu()
            for i, image in enumerate(chunk):
                mask = upsample(logits[i : i + 1], image.shape[:2]).argmax(1)[0].numpy().astype(np.uint8)
                name = names[start + i]
                _save_png(mask, out / f"{name}_mask.png")
                _save_png(overlay(image, mask), out / f"{name}_overlay.png")
                records.append(
                    {
                        "query": str(queries[start + i]),
                        "mask": f"{name}_mask.png",
                        "foreground": float(mask.mean()),
                    }
                )
            progress(len(chunk))
        seconds = time.perf_counter() - started
    finally:
        runner.close()
    summary = {
        "engine": str(engine),
        "runtime": str(choice.spec),
        "supports": [str(s) for s in supports],
        "queries": records,
        "seconds": round(seconds, 3),
    }
    (out / "infer.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
