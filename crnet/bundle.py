"""The bundle contract: a directory of graphs and engines described by a checked `manifest.json`.

`crnet export` writes bundles (crnet.export.writer); every command that runs one reads it here, once:
`load_bundle` checks the format version and every file's SHA-256 before any runtime touches it, and hands
the runtimes a `Bundle`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from crnet.config import ModelConfig
from crnet.errors import CRNetError

FORMAT = "crnet-bundle-1"
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16")
GRAPHS = ("encoder", "prompt", "head")


class BundleError(CRNetError):
    """A bundle directory, its manifest or one of its files is missing, foreign or damaged."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class BatchRange:
    """The batch sizes an engine accepts (TensorRT optimisation profile: min, opt, max)."""

    min: int = 1
    opt: int = 1
    max: int = 16

    @classmethod
    def parse(cls, text: str) -> BatchRange:
        """'MIN:OPT:MAX' -> BatchRange, with 1 <= min <= opt <= max."""
        try:
            low, opt, high = (int(part) for part in text.split(":"))
        except ValueError:
            raise CRNetError(f"--batch-range takes MIN:OPT:MAX, three integers, got {text!r}") from None
        if not 1 <= low <= opt <= high:
            raise CRNetError(f"--batch-range needs 1 <= MIN <= OPT <= MAX, got {text!r}")
        return cls(low, opt, high)

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class Bundle:
    """A loaded, checked bundle: its directory and manifest."""

    root: Path
    manifest: dict

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model_config"])

    @property
    def iterations(self) -> int:
        return self.manifest["iterations"]

    @property
    def batch(self) -> BatchRange:
        return BatchRange(**self.manifest["batch"])

    def graph(self, precision: str, name: str) -> Path:
        """Path of an ONNX graph; BundleError when the bundle was exported without that precision."""
        graphs = self.manifest["graphs"]
        if precision not in graphs:
            have = ", ".join(graphs) or "none"
            flag = " (export with --fp16)" if precision == "fp16" else ""
            raise BundleError(f"bundle {self.root} has no {precision} graphs{flag}; it has: {have}")
        return self.root / graphs[precision][name]["file"]

    def engine(self, precision: str, name: str) -> Path:
        """Path of a TensorRT engine; BundleError when none was built for that precision."""
        engines = self.manifest.get("engines", {})
        if precision not in engines:
            raise BundleError(
                f"bundle {self.root} has no {precision} TensorRT engines (export with --tensorrt"
                f"{' --fp16' if precision == 'fp16' else ''} on a machine with TensorRT)"
            )
        return self.root / engines[precision][name]["file"]


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read and check a bundle directory (or any file inside one)."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    manifest_path = root / MANIFEST
    if not path.exists():
        raise BundleError(f"{path} does not exist")
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a crnet bundle: no {MANIFEST} in it (make one with `crnet export`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"cannot read {manifest_path}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(f"{manifest_path} has format {found!r}; this crnet reads {FORMAT!r}")
    try:
        ModelConfig.from_dict(manifest["model_config"])
        entries = [
            entry
            for section in ("graphs", "engines")
            for per_precision in manifest[section].values()
            for entry in per_precision.values()
        ]
        files = [(root / entry["file"], entry["sha256"]) for entry in entries]
        manifest["iterations"], manifest["batch"]["max"]  # noqa: B018 - presence check
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise BundleError(f"{manifest_path} is incomplete or malformed ({error!r})") from None
    if verify:
        for file, expected in files:
            if not file.is_file():
                raise BundleError(f"bundle {root} lists {file.name} but the file is missing")
            if sha256(file) != expected:
                raise BundleError(f"{file} does not match its checksum in {MANIFEST}: damaged or replaced")
    return Bundle(root=root, manifest=manifest)
