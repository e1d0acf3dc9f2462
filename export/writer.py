"""Writing bundles: a temporary sibling directory, checksummed and renamed into place at the end, so a
directory named like the requested output is always complete (the layout is crnet.bundle's; the rules for
replacing an output are crnet.files')."""

from __future__ import annotations

import json
from pathlib import Path

from crnet.bundle import FORMAT, MANIFEST, BatchRange, is_replaceable_bundle, normalization, sha256
from crnet.config import ModelConfig
from crnet.files import StagedDirectory, write_text


def base_manifest(
    config: ModelConfig, iterations: int, batch: BatchRange, opset: int, checkpoint: Path
) -> dict:
    import torch

    from crnet import __version__

    return {
        "format": FORMAT,
        "preset": config.name,
        "model_config": config.to_dict(),
        "input_size": config.input_size,
        "feature_size": config.feature_size,
        "channels": config.channels,
        "normalization": normalization(),  # after resizing to input_size
        "iterations": iterations,
        "batch": batch.to_dict(),
        "opset": opset,
        "checkpoint": {"file": checkpoint.name, "sha256": sha256(checkpoint)},
        "crnet_version": __version__,
        "torch_version": torch.__version__,
        "graphs": {},
        "engines": {},
        "verification": {},
    }


def file_entry(root: Path, path: Path, **extra) -> dict:
    entry = {"file": path.relative_to(root).as_posix(), "sha256": sha256(path), "bytes": path.stat().st_size}
    return entry | extra


class BundleWriter(StagedDirectory):
    """Writes into a temporary sibling of `out`; `commit` adds the manifest and renames it into place.
    --overwrite replaces only an existing bundle, never a file, a foreign directory or the checkpoint."""

    def __init__(self, out: Path, *, overwrite: bool = False, inputs: tuple[Path, ...] = ()):
        super().__init__(
            out, what="crnet bundle", ours=is_replaceable_bundle, overwrite=overwrite, inputs=inputs
        )

    def commit(self, manifest: dict) -> Path:
        write_text(self.root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return super().commit()
