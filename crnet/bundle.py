"""The bundle contract: a directory of graphs and engines described by a checked `manifest.json`.

`crnet export` writes bundles (crnet.export.writer); every command that runs one reads it here, once:
`load_bundle` checks the format version and every file's SHA-256 before any runtime touches it, and hands
the runtimes a `Bundle`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from crnet.config import IMAGENET_MEAN, IMAGENET_STD, MAX_BATCH, MAX_ITERATIONS, ModelConfig
from crnet.errors import CRNetError
from crnet.files import holds_only, parse_json

FORMAT = "crnet-bundle-1"
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16")
GRAPHS = ("encoder", "prompt", "head")


# Every graph's (and engine's) inputs and outputs in order: the contract between the exporter and every
# runtime. Dimension 0 of every tensor is the batch, dynamic; `tensor_shapes` gives the others.
GRAPH_IO = {
    "encoder": (("images",), ("features",)),
    "prompt": (("features", "foreground"), ("vector", "prototype")),
    "head": (("features", "vector", "prototype"), ("logits",)),
}


def normalization() -> dict:
    """What every runtime does to an image before the encoder, as the manifest states it: RGB scaled to
    [0, 1], then (x - mean) / std."""
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": 1 / 255}


def graph_metadata(
    graph: str, precision: str, iterations: int, checkpoint_sha256: str | None = None
) -> dict[str, str]:
    """What the exporter writes into each ONNX graph (its metadata_props) and runtimes compare with the
    manifest: the graph's name, its precision, for the head the T unrolled in it, and the SHA-256 of the
    checkpoint it was exported from (a graph of another checkpoint's bundle must not pass as this one's)."""
    metadata = {"crnet.graph": graph, "crnet.precision": precision}
    if graph == "head":
        metadata["crnet.iterations"] = str(iterations)
    return metadata | ({"crnet.checkpoint": checkpoint_sha256} if checkpoint_sha256 else {})


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every graph tensor without its batch dimension."""
    size, side, channels = config.input_size, config.feature_size, config.channels
    return {
        "images": (3, size, size),
        "foreground": (1, size, size),
        "features": (channels, side, side),
        "vector": (channels,),
        "prototype": (channels,),
        "logits": (2, size, size),
    }


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
        """'MIN:OPT:MAX' -> BatchRange, with 1 <= min <= opt <= max <= MAX_BATCH."""
        parts = text.split(":")
        # ASCII digits only: int() also takes '1_0', '+1', spaces and other scripts' digits
        if len(parts) != 3 or not all(part.isascii() and part.isdigit() for part in parts):
            raise CRNetError(f"--batch-range takes MIN:OPT:MAX, three integers, got {text!r}")
        # past MAX_BATCH's digits, out of range (and int() refuses 4300 digits with its own error)
        longest = len(str(MAX_BATCH))
        low, opt, high = (int(p) if len(p.lstrip("0")) <= longest else MAX_BATCH + 1 for p in parts)
        if not 1 <= low <= opt <= high <= MAX_BATCH:
            raise CRNetError(f"--batch-range needs 1 <= MIN <= OPT <= MAX <= {MAX_BATCH}, got {text!r}")
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

    def check_checkpoint(self, checkpoint: Path) -> None:
        """BundleError unless the bundle was exported from this checkpoint file (its SHA-256 is in the
        manifest): comparing runtimes of two different models would report meaningless agreement."""
        source = self.manifest.get("checkpoint", {})
        if sha256(checkpoint) != source.get("sha256"):
            name, digest = source.get("file", "?"), str(source.get("sha256"))[:12]
            raise BundleError(
                f"bundle {self.root} was exported from another checkpoint ({name}, SHA-256 {digest}...), "
                f"not from {checkpoint}: pass that checkpoint, or export {checkpoint} to a bundle"
            )

    def check_metadata(self, file: Path, graph: str, precision: str, metadata: dict[str, str]) -> None:
        """BundleError where what the exporter wrote into a graph contradicts the manifest's listing (files
        swapped, or the manifest edited with the checksums recomputed: a head unrolled for another T would
        be compared with a reference run at the manifest's; a graph of another checkpoint's bundle). Graphs
        of older exports carry none of it, or all but the checkpoint (exports before 2026-11-27)."""
        if not any(key.startswith("crnet.") for key in metadata):
            return
        checkpoint = self.manifest.get("checkpoint", {}).get("sha256")
        expected = graph_metadata(graph, precision, self.iterations, checkpoint)
        if "crnet.checkpoint" not in metadata:
            expected.pop("crnet.checkpoint", None)
        differ = [key for key, value in expected.items() if metadata.get(key) != value]
        wrong = [f"{key} {metadata.get(key, '(none)')}" for key in differ]
        if wrong:
            stated = ", ".join(f"{key} {value}" for key, value in expected.items())
            raise BundleError(
                f"{file} was exported with {', '.join(wrong)}, but {MANIFEST} lists it with {stated} (files "
                "swapped, or the manifest edited?); re-export the bundle"
            )

    def check_tensors(self, file: Path, graph: str, inputs: list[tuple], outputs: list[tuple]) -> None:
        """Compare what a loaded graph or engine declares, [(name, shape)] with the batch dimension first
        (a string, None or -1 where dynamic), with the contract; BundleError on any difference, as when
        files were swapped or the manifest edited with the checksums recomputed."""
        shapes = tensor_shapes(self.model_config)
        expected = [[(n, shapes[n]) for n in names] for names in GRAPH_IO[graph]]
        found = [
            [
                (name, tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)[1:])
                for name, shape in side
            ]
            for side in (inputs, outputs)
        ]
        if found != expected:
            raise BundleError(
                f"{file} does not fit bundle {self.root}: as the {graph} graph it should map "
                f"{_signature(expected)}, but it maps {_signature(found)} (files swapped, or the manifest "
                "edited?); re-export the bundle"
            )


def _signature(sides: list[list[tuple]]) -> str:
    def side(tensors):
        return ", ".join(
            f"{n} {'x'.join('?' if d is None else str(d) for d in shape)}" for n, shape in tensors
        )

    return f"({side(sides[0])}) -> ({side(sides[1])})"


def file_entries(manifest: dict) -> list[dict]:
    """The manifest's entry ({"file", "sha256", ...}) for every graph and engine it lists."""
    return [
        entry
        for section in ("graphs", "engines")
        for per_precision in manifest[section].values()
        for entry in per_precision.values()
    ]


def is_replaceable_bundle(path: Path) -> bool:
    """Whether `export --overwrite` may replace a directory: a bundle (damaged or not) holding nothing but
    its manifest and the files the manifest lists, so that replacing it loses nothing else."""
    try:
        manifest = parse_json((Path(path) / MANIFEST).read_text())
        listed = [entry["file"] for entry in file_entries(manifest)]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return False
    return manifest.get("format") == FORMAT and holds_only(Path(path), [MANIFEST, *listed])


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read and check a bundle directory (or any file inside one)."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    manifest_path = root / MANIFEST
    if not path.exists():
        raise BundleError(f"{path} does not exist")
    if not manifest_path.is_file():
        where = f"{path} is not a crnet bundle: no {MANIFEST} in it"
        if not path.is_dir():
            where = f"{path} is not in a crnet bundle: no {MANIFEST} beside it"
        raise BundleError(f"{where} (make one with `crnet export`)")
    try:
        manifest = parse_json(manifest_path.read_text())
    except (OSError, ValueError) as error:  # ValueError: not UTF-8, not JSON, an integer past 4300 digits
        raise BundleError(f"cannot read {manifest_path}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(f"{manifest_path} has format {found!r}; this crnet reads {FORMAT!r}")
    try:
        _check_manifest(manifest)
        files = [(root / entry["file"], entry["sha256"]) for entry in file_entries(manifest)]
        manifest["iterations"], manifest["batch"]["max"]  # noqa: B018 - presence check
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise BundleError(f"{manifest_path} is incomplete or malformed ({error})") from None
    if verify:
        for file, expected in files:
            if not file.is_file():
                raise BundleError(f"bundle {root} lists {file.name} but the file is missing")
            if sha256(file) != expected:
                raise BundleError(f"{file} does not match its checksum in {MANIFEST}: damaged or replaced")
    return Bundle(root=root, manifest=manifest)


def _check_manifest(manifest: dict) -> None:
    """ValueError (or KeyError, TypeError) where the manifest contradicts itself or the contract."""
    config = ModelConfig.from_dict(manifest["model_config"])
    stated = {k: manifest[k] for k in ("input_size", "feature_size", "channels")}
    derived = {
        "input_size": config.input_size,
        "feature_size": config.feature_size,
        "channels": config.channels,
    }
    # type(...) is int: JSON's 129.0 equals 129 but is no size, and True is no count (as in checkpoints).
    if stated != derived or not all(type(v) is int for v in stated.values()):
        raise ValueError(f"its sizes {stated} contradict its model config {derived}")
    if manifest["preset"] != config.name:
        raise ValueError(f"its preset {manifest['preset']!r} contradicts its model config {config.name!r}")
    # Every runtime normalises with the ImageNet statistics; a manifest that states others is not ours.
    stated, expected = manifest["normalization"], normalization()
    if stated != expected:
        raise ValueError(f"its normalization {stated} is not the one its runtimes use, {expected}")
    if type(manifest["opset"]) is not int or manifest["opset"] < 1:
        raise ValueError(f"opset {manifest['opset']!r} is not an ONNX opset number")
    iterations = manifest["iterations"]
    if type(iterations) is not int or not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations {iterations!r} is not a count from 1 to {MAX_ITERATIONS}")
    batch = manifest["batch"]
    if not all(type(batch[k]) is int for k in ("min", "opt", "max")) or not (
        1 <= batch["min"] <= batch["opt"] <= batch["max"] <= MAX_BATCH
    ):
        raise ValueError(f"batch range {batch} is not 1 <= min <= opt <= max <= {MAX_BATCH}")
    for section in ("graphs", "engines"):
        for precision, graphs in manifest[section].items():
            if precision not in PRECISIONS or set(graphs) != set(GRAPHS):
                raise ValueError(f"{section} holds {precision}: {sorted(graphs)}, not {list(GRAPHS)}")
            for name, entry in graphs.items():
                file = entry["file"]
                # a name in the bundle's folder, as the exporter writes them: not a path that leaves it
                if type(file) is not str or file != Path(file).name or file in ("", ".", "..", MANIFEST):
                    raise ValueError(f"{precision} {name} is listed as {file!r}, not a file of the bundle")
                io = entry.get("inputs"), entry.get("outputs")
                if section == "graphs" and tuple(map(tuple, io)) != GRAPH_IO[name]:
                    raise ValueError(f"{precision} {name} is listed with tensors {io}, not {GRAPH_IO[name]}")
