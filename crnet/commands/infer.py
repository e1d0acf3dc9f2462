"""`crnet infer`: k labelled supports, many queries; the support prompt is computed once.

Writes, per query, `<name>_mask.png` (0 = background, 1 = object, at the query's size as viewers show it,
turned by its EXIF orientation) and `<name>_overlay.png`, plus `infer.json` with the settings and per-query
foreground share. Support images and masks are read as shown too. The folder is
written whole or not at all: built beside OUT and renamed into place at the end (crnet.files), so that an
interrupted or failed run leaves no loose masks, and an earlier output is either kept or replaced.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import crnet.device
from crnet import checkpoint as checkpoints
from crnet.bundle import MANIFEST, Bundle, load_bundle
from crnet.commands.visualize import overlay
from crnet.config import feature_side
from crnet.data.episodes import to_model_input
from crnet.data.masks import read_binary_mask
from crnet.data.pascal import read_image
from crnet.engines import RuntimeSpec, deployed_gpu, open_runtime, runtime_device
from crnet.engines.base import Runtime
from crnet.errors import (
    CheckpointError,
    CRNetError,
    CRNetWarning,
    EmptySupportMaskError,
    NoSupportError,
)
from crnet.files import (
    NAME_MAX,
    StagedDirectory,
    atomic_file,
    cut_to_bytes,
    holds_only,
    parse_json,
    write_text,
)
from crnet.model.crnet import upsample
from crnet.model.inputs import pooled_objects, stride


@dataclass(frozen=True)
class EngineChoice:
    spec: RuntimeSpec
    checkpoint: Path | None
    bundle: Bundle | None
    device: torch.device


def choose_engine(path: Path, runtime: str | None, device: torch.device | None) -> EngineChoice:
    """What `--engine` names: a checkpoint (torch), a bundle, or a graph/engine file inside a bundle;
    `runtime` is a spec (NAME[:PRECISION][+OPTION]) or None for the best the engine and device allow;
    `device` None picks one for the runtime (crnet.engines.runtime_device)."""
    if not path.exists():
        raise CRNetError(f"engine not found: {path}")
    gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
    # A file that is not a graph or engine of a bundle may be a checkpoint under another name (.pth, .PT).
    in_a_bundle = path.suffix in (".onnx", ".plan") or (path.parent / MANIFEST).is_file()
    if path.is_file() and (path.suffix == ".pt" or not in_a_bundle):
        if path.suffix != ".pt":
            try:
                checkpoints.load(path)
            except checkpoints.EditedConfigError:
                raise  # a crnet checkpoint all the same: its own message says what is wrong
            except CheckpointError:
                raise CRNetError(
                    f"--engine {path} is neither a crnet checkpoint nor a graph or engine in a bundle (give "
                    "a bundle directory, a file in one, or a .pt checkpoint)"
                ) from None
        spec = RuntimeSpec.parse(runtime or (deployed_gpu() if gpu else "torch"))
        if spec.name != "torch":
            raise CRNetError(f"{path} is a checkpoint: it runs on the torch runtime, not {spec.name}")
        return EngineChoice(spec, path, None, runtime_device(spec, device))
    bundle = load_bundle(path)  # BundleError for foreign files and directories
    if path.is_file():  # a graph or engine inside the bundle fixes runtime and precision
        implied = {".onnx": "onnxruntime", ".plan": "tensorrt"}.get(path.suffix)
        if implied is None:
            raise CRNetError(f"{path} is neither a .pt checkpoint, an .onnx graph nor a .plan engine")
        section = "graphs" if implied == "onnxruntime" else "engines"
        listed = {
            entry["file"]: precision
            for precision, entries in bundle.manifest[section].items()
            for entry in entries.values()
        }
        if path.name not in listed:  # its name would have been read as a precision
            raise CRNetError(
                f"{path} is not one of the {section} bundle {bundle.root} lists; give the bundle's folder or "
                f"one of {', '.join(sorted(listed)) or 'its files'}"
            )
        precision = listed[path.name]
        spec = RuntimeSpec.parse(runtime or implied, defaults={implied: precision})
        if (spec.name, spec.precision) != (implied, precision):
            raise CRNetError(f"{path} is a {precision} {implied} file; --runtime {runtime} asks for another")
        return EngineChoice(spec, None, bundle, runtime_device(spec, device))
    if runtime is None:
        has_engines = "fp16" in bundle.manifest.get("engines", {})
        runtime = "tensorrt:fp16" if gpu and has_engines else "onnxruntime:fp32"
    spec = RuntimeSpec.parse(runtime)
    return EngineChoice(spec, None, bundle, runtime_device(spec, device))


def load_support(image_path: Path, mask_path: Path, size: int):
    image = read_image(image_path, as_shown=True)
    mask = read_binary_mask(mask_path, image.shape[:2])
    tensor, resized = to_model_input(image, mask, size)
    if not (resized == 1).any():
        raise EmptySupportMaskError(
            f"support mask {mask_path} marks too few pixels: its object vanishes at the {size}x{size} input"
        )
    side = feature_side(size)
    if not pooled_objects(resized[None], side).all():  # the prompt would be zero: nothing to find
        raise EmptySupportMaskError(
            f"support mask {mask_path} marks too few pixels: at the {size}x{size} input its object lies "
            f"between the points the prompt samples on the {side}x{side} feature grid (one every "
            f"{stride(size, side)} pixels)"
        )
    return tensor, resized


def _save_png(array: np.ndarray, path: Path) -> None:
    """Atomic (crnet.files): an interrupted run never leaves a truncated picture under the final name."""
    with atomic_file(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG")


SUMMARY = "infer.json"


def overlay_name(mask: str) -> str:
    """The overlay's file name beside a mask's (`<name>_mask.png` -> `<name>_overlay.png`)."""
    return mask.removesuffix("_mask.png") + "_overlay.png"


def earlier_output(out: Path) -> list[str] | None:
    """The files of an earlier infer's output, if a folder holds that and nothing else: its infer.json and
    the masks and overlays that infer.json lists; else None."""
    try:
        summary = parse_json((out / SUMMARY).read_text())
        masks = [record["mask"] for record in summary["queries"]]
        overlays = [overlay_name(mask) for mask in masks]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    names = [SUMMARY, *masks, *overlays]
    return names if holds_only(out, names) else None


def output_names(queries: list[Path]) -> list[str]:
    """Query file stems, made unique (two queries may share a name in different folders, and a numbered
    name may be another query's stem: a/x, b/x, x_1 give x, x_1, x_1_1), and cut short where a file named
    after one would pass NAME_MAX bytes (a query's own name may be 255 bytes long; infer.json says which
    mask is whose)."""
    room = NAME_MAX - len("_overlay.png")  # the longer of the two files named after the query
    names: list[str] = []
    for query in queries:
        name, count = cut_to_bytes(query.stem, room), 0
        while name in names:
            count += 1
            name = cut_to_bytes(query.stem, room - len(f"_{count}")) + f"_{count}"
        names.append(name)
    return names


class QueryImages:
    """Every query decoded once up front, so that an unreadable one is an error before anything is
    computed; the decoded images are kept for the work while they fit in KEPT_BYTES, and the rest are read
    again when their turn comes (a folder of phone photos is tens of MB each, decoded)."""

    KEPT_BYTES = 1 << 30

    def __init__(self, paths: list[Path]):
        self.paths, self.kept, kept_bytes = paths, {}, 0
        for index, path in enumerate(paths):
            image = read_image(path, as_shown=True)
            if kept_bytes + image.nbytes <= self.KEPT_BYTES:
                self.kept[index], kept_bytes = image, kept_bytes + image.nbytes

    def take(self, index: int) -> np.ndarray:
        """The query's image, given up by this object (read again if it was not kept)."""
        if index in self.kept:
            return self.kept.pop(index)
        with warnings.catch_warnings():  # its warnings (an animation's frames) were given at the first read
            warnings.simplefilter("ignore", CRNetWarning)
            return read_image(self.paths[index], as_shown=True)


def infer(
    engine: Path,
    supports: list[Path],
    support_masks: list[Path],
    queries: list[Path],
    out: Path,
    *,
    runtime: str | None = None,
    device: torch.device | None = torch.device("cpu"),
    batch_size: int = 8,
    progress=lambda n: None,
) -> dict:
    if not supports:
        raise NoSupportError("give at least one --support image with its --support-mask")
    if len(supports) != len(support_masks):
        raise CRNetError(f"{len(supports)} --support images but {len(support_masks)} --support-mask files")
    if not queries:
        raise CRNetError("give at least one --query image")
    if batch_size < 1:
        raise CRNetError(f"--batch-size must be >= 1, got {batch_size}")
    names = output_names(queries)
    inputs = [*supports, *support_masks, *queries, engine]
    ours = lambda folder: earlier_output(folder) is not None  # noqa: E731
    staged = StagedDirectory(out, what="crnet infer output", ours=ours, replaces_own=True, inputs=inputs)
    with staged:
        summary = segment_into(
            staged.root,
            engine,
            supports,
            support_masks,
            queries,
            names,
            runtime,
            device,
            batch_size,
            progress,
        )
        staged.commit()  # replaces an earlier output whole, or makes the folder
    return summary


def segment_into(
    folder: Path,
    engine: Path,
    supports: list[Path],
    support_masks: list[Path],
    queries: list[Path],
    names: list[str],
    runtime: str | None,
    device: torch.device | None,
    batch_size: int,
    progress,
) -> dict:
    """infer's work, its files written into `folder` (the staged output); the summary."""
    choice = choose_engine(engine, runtime, device)  # device None: the runtime's best
    device = choice.device
    crnet.device.flush_denormals_for_inference(device)
    runner: Runtime = open_runtime(
        choice.spec, checkpoint=choice.checkpoint, bundle=choice.bundle, device=device
    )
    try:
        size = runner.input_size
        # Every input is read and checked before anything is computed or written.
        loaded = [load_support(i, m, size) for i, m in zip(supports, support_masks, strict=True)]
        query_images = QueryImages(queries)
        runner.check_batch(len(loaded))
        progress(0)  # every input checked: a progress bar may show from here
        images = torch.stack([t for t, _ in loaded]).to(device)
        masks = torch.stack([m for _, m in loaded]).to(device)
        started = time.perf_counter()
        prompt = runner.prompt(runner.encode(images).unsqueeze(0), masks.unsqueeze(0))
        if runner.max_batch is not None:
            batch_size = min(batch_size, runner.max_batch)
        records = []
        for start in range(0, len(queries), batch_size):
            chunk = [query_images.take(i) for i in range(start, min(start + batch_size, len(queries)))]
            tensors = torch.stack([to_model_input(image, None, size)[0] for image in chunk]).to(device)
            logits = runner.query(tensors, prompt).float().cpu()  # one prompt serves every query
            for i, image in enumerate(chunk):
                mask = upsample(logits[i : i + 1], image.shape[:2]).argmax(1)[0].numpy().astype(np.uint8)
                name = names[start + i]
                _save_png(mask, folder / f"{name}_mask.png")
                _save_png(overlay(image, mask), folder / f"{name}_overlay.png")
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
        "device": str(device),
        "supports": [str(s) for s in supports],
        "queries": records,
        "seconds": round(seconds, 3),
    }
    write_text(folder / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary
