"""The built-in benchmark: procedural few-shot segmentation scenes (crnet.data.scenes) written as a tree in
the PASCAL VOC layout, deterministic from the seed, checked before every use.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from crnet.data.scenes import (
    CLASS_NAMES,
    FOLDS,
    IGNORE_INDEX,
    NUM_CLASSES,
    band_width,
    ignore_band,
    render_sample,
)
from crnet.errors import DataError
from crnet.files import as_created, ensure_parent, explain, hidden_prefix, parse_json

GENERATOR_VERSION = 2
MARKER = "synthetic.json"
IMAGE_AND_LABEL = (("JPEGImages", ".jpg"), ("SegmentationClassAug", ".png"))
SPLITS = (("train", "train_aug"), ("val", "val"))  # (id prefix, list name); the index seeds the rng


class BenchmarkRootError(DataError, ValueError):
    """The root holds something other than a complete benchmark made with the requested parameters."""


# --------------------------------------------------------------------------------------------- writing


def _params(
    *, seed: int = 0, train_per_class: int = 120, val_per_class: int = 60, image_size: int = 128
) -> dict:
    for name, value, low in (
        ("train_per_class", train_per_class, 0),
        ("val_per_class", val_per_class, 0),
        ("image_size", image_size, 32),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "image_size": image_size,
    }


def generate(
    root: str | Path,
    *,
    seed: int = 0,
    train_per_class: int = 120,
    val_per_class: int = 60,
    image_size: int = 128,
) -> Path:
    """Write the benchmark under root in the VOC layout; deterministic from seed. Returns root.

    Image i of a split has main class i // per_class + 1. The marker file synthetic.json is written last,
    so a tree that has it is complete.
    """
    params = _params(
        seed=seed, train_per_class=train_per_class, val_per_class=val_per_class, image_size=image_size
    )
    root = Path(root)
    images, labels = root / "JPEGImages", root / "SegmentationClassAug"
    lists = root / "ImageSets" / "Segmentation"
    for folder in (images, labels, lists):
        folder.mkdir(parents=True, exist_ok=True)
    width = band_width(image_size)
    for split_index, ((prefix, list_name), per_class) in enumerate(
        zip(SPLITS, (train_per_class, val_per_class), strict=True)
    ):
        ids = []
        for index in range(NUM_CLASSES * per_class):
            image, label = render_sample(seed, split_index, index, index // per_class + 1, image_size)
            name = f"syn_{prefix}_{index:06d}"
            Image.fromarray(image).save(images / f"{name}.jpg", quality=95)
            Image.fromarray(ignore_band(label, width)).save(labels / f"{name}.png")
            ids.append(name)
        (lists / f"{list_name}.txt").write_text("".join(f"{i}\n" for i in sorted(ids)))
    meta = {
        "generator": "crnet.data.synthetic",
        **params,
        "class_names": list(CLASS_NAMES),
        "folds": [list(f) for f in FOLDS],
        "ignore_index": IGNORE_INDEX,
    }
    (root / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return root


def _read_marker(root: Path) -> dict | None:
    try:
        return parse_json((root / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BenchmarkRootError(
            f"{root / MARKER} exists but cannot be read ({exc}); remove {root} to regenerate"
        ) from exc


def _check_marker(root: Path, params: dict) -> bool:
    """True if root holds a complete benchmark made with `params`; BenchmarkRootError if another one."""
    meta = _read_marker(root)
    if meta is None:
        return False
    found = {key: meta.get(key) for key in params}
    if found != params:
        raise BenchmarkRootError(
            f"{root} holds a synthetic benchmark made with different parameters: found {found}, "
            f"asked for {params}; choose another root or remove it"
        )
    _check_complete(root, params)
    return True


def _check_complete(root: Path, params: dict) -> None:
    """BenchmarkRootError unless every image, label and list the marker promises is there, and each list
    names its split's images: a tree with files deleted was "ready", and the command after it failed on the
    first one (or, with a list edited, ran on another benchmark)."""
    try:
        present = {}
        for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
            with os.scandir(root / folder) as entries:
                present[folder] = {entry.name for entry in entries if entry.is_file()}
    except OSError as error:
        raise BenchmarkRootError(
            f"{root} is an incomplete synthetic benchmark ({error.strerror}: "
            f"{error.filename}); remove it and run again to regenerate it"
        ) from None
    expected, lists = [], {}
    for (prefix, list_name), per_class in zip(
        SPLITS, (params["train_per_class"], params["val_per_class"]), strict=True
    ):
        ids = [f"syn_{prefix}_{index:06d}" for index in range(NUM_CLASSES * per_class)]
        lists[root / "ImageSets" / "Segmentation" / f"{list_name}.txt"] = ids
        expected.append(("ImageSets/Segmentation", f"{list_name}.txt"))
        expected += [(folder, f"{i}{suffix}") for i in ids for folder, suffix in IMAGE_AND_LABEL]
    missing = [root / folder / name for folder, name in expected if name not in present[folder]]
    if missing:
        raise BenchmarkRootError(
            f"{root} is a synthetic benchmark with {len(missing)} of its files missing (first: "
            f"{missing[0]}); remove {root} and run again to regenerate it"
        )
    for path, ids in lists.items():
        try:
            listed = path.read_text().split()
        except (OSError, UnicodeDecodeError) as error:
            message = f"cannot read {path} ({error}); remove {root} and run again to regenerate it"
            raise BenchmarkRootError(message) from None
        if listed != ids:
            raise BenchmarkRootError(
                f"{path} does not list its split's {len(ids)} images as written ({len(listed)} ids): edited? "
                f"remove {root} and run again to regenerate it"
            )


def _only_generator_files(root: Path) -> bool:
    """True if every file under root is one the generator writes (the leftovers of an interrupted run)."""
    allowed_dirs = {
        Path("JPEGImages"),
        Path("SegmentationClassAug"),
        Path("ImageSets"),
        Path("ImageSets/Segmentation"),
    }
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_dir() and not path.is_symlink():
            if rel not in allowed_dirs:
                return False
        elif not (
            (rel.parent == Path("JPEGImages") and rel.name.startswith("syn_") and rel.suffix == ".jpg")
            or (
                rel.parent == Path("SegmentationClassAug")
                and rel.name.startswith("syn_")
                and rel.suffix == ".png"
            )
            or (rel.parent == Path("ImageSets/Segmentation") and rel.name in ("train_aug.txt", "val.txt"))
        ):
            return False
    return True


def _remove_leftovers(root: Path) -> None:
    """Remove an empty root, or one holding only an interrupted generation's files, checked again now:
    the user may have put files there while this run generated (they were deleted with it)."""
    try:
        root.rmdir()  # empty: refuses, atomically, once anything was added
        return
    except OSError:
        pass
    if not _only_generator_files(root):
        raise BenchmarkRootError(
            f"{root} received other files while the benchmark was generated; refusing to replace it: "
            "choose another root or empty it"
        )
    shutil.rmtree(root)


def ensure(root: str | Path, **kwargs) -> Path:
    """Generate unless root already holds a complete benchmark made with the same parameters; atomic.

    The tree is built in a temporary sibling directory and renamed into place, so an interrupted run never
    leaves a tree that looks complete. An existing incomplete root is replaced only if it holds nothing
    but generator output; anything else, or a benchmark made with other parameters, raises
    BenchmarkRootError (a ValueError and a crnet DataError); user data is never deleted.
    """
    params = _params(**kwargs)
    root = Path(os.path.realpath(root)) if Path(root).is_symlink() else Path(root)  # a link: where it points
    if root.exists() and not root.is_dir():
        raise BenchmarkRootError(f"{root} exists and is not a directory")
    if root.is_dir():
        if _check_marker(root, params):
            return root
        if not _only_generator_files(root):
            raise BenchmarkRootError(
                f"{root} exists, is not a complete synthetic benchmark and holds other files; "
                "refusing to overwrite it: choose another root or empty it"
            )
    ensure_parent(root)  # OutputError in one line when a part of the path is a file or cannot be made
    try:
        tmp = Path(tempfile.mkdtemp(prefix=hidden_prefix(root.name, "tmp-"), dir=root.parent))
        as_created(tmp)
    except OSError as error:
        raise explain(error, root) from None
    try:
        generate(tmp, **kwargs)
        if root.is_dir() and _read_marker(root) is None:
            _remove_leftovers(root)
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process finished first: accept its tree if it matches.
            if root.is_dir() and _check_marker(root, params):
                return root
            raise
    except OSError as error:  # a full disk, say: the partial tree goes (finally), one line says why
        raise explain(error, root) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
