"""Writing bundles: a temporary sibling directory, checksummed and renamed into place at the end, so a
directory named like the requested output is always complete (the layout is crnet.bundle's)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from crnet.bundle import FORMAT, MANIFEST, BatchRange, sha256
from crnet.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from crnet.errors import CRNetError


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
        # Runtimes feed RGB images scaled to [0, 1], then (x - mean) / std, resized to input_size.
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": 1 / 255},
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


class BundleWriter:
    """Writes into a temporary sibling of `out`; `commit` checksums and renames it into place."""

    def __init__(self, out: Path, *, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise CRNetError(f"{self.out} already exists; pass --overwrite to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))

    def commit(self, manifest: dict) -> Path:
        (self.root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.root, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.root, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
