"""PASCAL-5i on a VOC2012 + SBD-aug tree: image access, label checks, and the per-class image index.

Layout: JPEGImages/<id>.jpg, SegmentationClassAug/<id>.png (class ids 0..20, 255 = ignore),
ImageSets/Segmentation/{train_aug.txt | train.txt, val.txt}. The built-in synthetic benchmark writes the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from crnet.errors import CRNetError, CRNetWarning, ImageReadError, MaskError, NotAVOCTreeError
from crnet.files import OutputError, parse_json, write_text

NUM_CLASSES = 20
NUM_FOLDS = 4
IGNORE_LABEL = 255
SPLIT_FILES = {"train": ("train_aug.txt", "train.txt"), "val": ("val.txt",)}
INDEX_VERSION = 2  # 2: labels with values outside 0..20, 255 are refused while indexing
# The small-object rule of PFENet and BAM (util/dataset.py, make_dataset: `tmp_label.sum() >= 2 * 32 * 32`,
# on training and test lists): a class counts in an image from 2048 pixels at the original resolution.
MIN_OBJECT_PIXELS = 2 * 32 * 32
VOC_IMAGE_AREA = 500 * 375  # a typical PASCAL VOC image; the rule is 1.09 % of it
MIN_SIDE, MAX_SIDE = 32, 2048  # the built-in benchmark's image sides, as `crnet synth --image-size` allows
# fmt: off
VOC_CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# fmt: on


class FoldError(CRNetError, ValueError):
    """A fold outside 0..3: a user error the CLI reports in one line, and a ValueError for callers."""


def fold_classes(fold: int) -> tuple[int, ...]:
    """The 5 novel (test) classes of PASCAL-5i fold i: 5i+1 .. 5i+5."""
    if not 0 <= fold < NUM_FOLDS:
        raise FoldError(f"fold must be in 0..{NUM_FOLDS - 1}, got {fold}")
    per_fold = NUM_CLASSES // NUM_FOLDS
    return tuple(range(fold * per_fold + 1, (fold + 1) * per_fold + 1))


def base_classes(fold: int) -> tuple[int, ...]:
    """The 15 training classes of fold i: every class that is not novel."""
    novel = set(fold_classes(fold))
    return tuple(c for c in range(1, NUM_CLASSES + 1) if c not in novel)


@contextlib.contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """Image.open for the whole of a read, PIL's warnings and log records turned into crnet's one-line
    warnings: a very large image (PIL's two lines of source) and a damaged EXIF block, say. A read that
    fails says only its error, with what PIL logged as its reason (its own message may say less: "cannot
    identify image file"). Above twice PIL's pixel limit, Image.open refuses the image (the bomb error)."""
    logged = _PILRecords()
    pil = logging.getLogger("PIL")
    pil.addHandler(logged)
    propagate, pil.propagate = pil.propagate, False  # else Python's last-resort handler prints them
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with Image.open(path) as image:
                    pixels = image.width * image.height
                    yield image
            except UNREADABLE as error:
                if logged.messages:
                    raise OSError("; ".join(logged.messages)) from error
                raise
    finally:
        pil.removeHandler(logged)
        pil.propagate = propagate
    for warning in caught:
        if issubclass(warning.category, CRNetWarning):
            message = str(warning.message)
        elif issubclass(warning.category, Image.DecompressionBombWarning):
            message = f"{path} has {pixels} pixels: reading it takes much memory"
        else:
            message = f"{path}: {' '.join(str(warning.message).split())}"
        warnings.warn(message, CRNetWarning, stacklevel=4)
    for message in logged.messages:
        warnings.warn(f"{path}: {message}", CRNetWarning, stacklevel=4)


class _PILRecords(logging.Handler):
    """PIL's log records of warning level and above, kept: it logs some reasons before it raises."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


ANIMATED = ("GIF", "PNG", "TIFF", "WEBP")  # formats whose further frames are pictures of their own
# What PIL raises for a file it cannot decode: besides OSError and ValueError (a damaged header, a PGM's
# size), a damaged PNG chunk is a SyntaxError; a truncated GIF's or TIFF's frames an IndexError, TypeError,
# EOFError or struct.error, a damaged tag of a later TIFF page a KeyError; a header claiming billions of
# pixels the bomb error.
UNREADABLE = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    IndexError,
    KeyError,
    TypeError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: turned by its EXIF orientation (a phone's photo is stored sideways).
    Decode the pixels first (`Image.load`): a decoding error inside this would pass for an EXIF one."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block: PIL's parsers raise several types; the pixels as stored
        return image


def _frames(image: Image.Image, path: Path) -> int:
    """How many frames the file holds; counting them reads every frame's header."""
    try:
        return getattr(image, "n_frames", 1)
    except UNREADABLE as error:
        raise ImageReadError(
            f"cannot read image {path}: a frame after the first is damaged ({_reason(error)})"
        ) from None


def _decoded(image: Image.Image, as_shown: bool) -> Image.Image:
    """Every pixel decoded now, so that a damaged file fails here (PIL decodes on first use, and a failed
    decode leaves the rest black), then turned as shown where asked."""
    messages: list[str] = []
    try:
        with _libtiff_messages(image.format == "TIFF", messages):
            image.load()
    except UNREADABLE as error:
        if messages:  # libtiff's reason, not PIL's "decoder error -2"
            raise OSError("; ".join(messages)) from error
        raise
    if messages:  # the image decoded all the same: libtiff's warnings
        warnings.warn(f"{image.filename}: {'; '.join(messages)}", CRNetWarning, stacklevel=3)
    return upright(image) if as_shown else image


_LIBTIFF_NAME = "tempfile.tif"


@contextlib.contextmanager
def _libtiff_messages(collect: bool, messages: list[str]) -> Iterator[None]:
    """libtiff (which decodes compressed TIFFs for PIL) prints its errors and warnings to the process's
    stderr from C: collected into `messages` instead, so that a damaged TIFF is one error line."""
    if not collect:
        yield
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as caught:
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode(errors="replace").splitlines()
            # PIL names the file to libtiff "tempfile.tif", which libtiff puts before some messages
            messages += [" ".join(line.removeprefix(f"{_LIBTIFF_NAME}: ").split()) for line in lines]


def read_image(path: Path, *, as_shown: bool = False) -> np.ndarray:
    """RGB uint8 (H, W, 3); grayscale, palette, RGBA, CMYK and 16-bit grayscale are converted. `as_shown`
    turns it by its EXIF orientation (a user's photo, in infer); a dataset's images are read as stored, the
    way their labels were drawn. Raises ImageReadError."""
    try:
        with open_image(path) as image:
            # an animation, a multi-page TIFF (a phone's JPEG, MPO, holds a second frame that is no picture)
            if image.format in ANIMATED and _frames(image, path) > 1:
                warnings.warn(
                    f"{path} holds {image.n_frames} frames; the first is used", CRNetWarning, stacklevel=2
                )
            pgm = image.format == "PPM"
            image = _decoded(image, as_shown)
            # 16-bit grayscale: PIL would clip the values to 255, not scale them. A PGM whose maxval is above
            # 255 opens as 32-bit integers, which PIL scales to 0..65535.
            if image.mode.startswith("I;16") or (image.mode == "I" and pgm):
                gray = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
                return np.repeat(gray[:, :, None], 3, axis=2)
            if image.mode in ("I", "F"):
                raise ImageReadError(
                    f"cannot read image {path}: mode {image.mode} (32-bit) has no defined range; save it as "
                    "8-bit RGB or grayscale"
                )
            if image.mode == "P" and "transparency" in image.info:  # PIL warns unless it goes through RGBA
                image = image.convert("RGBA")
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {path}") from None
    except UNREADABLE as error:  # ValueError also: a mode PIL cannot turn into RGB (some TIFFs)
        raise ImageReadError(f"cannot read image {path}: {_reason(error)}") from None


def read_label(path: Path, *, as_shown: bool = False, binary: bool = False) -> np.ndarray:
    """Single-channel uint8 (H, W) label map, palette indices kept as they are; `as_shown` as read_image.
    A `binary` one is a support mask: named so in errors, and a 1-bit image's set pixels are its object.
    Raises ImageReadError."""
    what = "mask" if binary else "label"
    try:
        with open_image(path) as image:
            image = _decoded(image, as_shown)
            if binary and image.mode == "1":  # as 0 and 1, not PIL's 0 and 255 (255 is "ignore")
                return np.asarray(image, dtype=bool).astype(np.uint8)
            if image.mode not in ("L", "P"):
                raise MaskError(
                    f"{what} {path} must be a single-channel PNG (8-bit grey or palette), got mode "
                    f"{image.mode}"
                )
            return np.asarray(image, dtype=np.uint8)  # palette PNGs keep their indices
    except FileNotFoundError:
        raise ImageReadError(f"{what} not found: {path}") from None
    except UNREADABLE as error:
        raise ImageReadError(f"cannot read {what} {path}: {_reason(error)}") from None


def _reason(error: Exception) -> str:
    """PIL's message, or the error's type where it has none (a truncated frame table's IndexError)."""
    if isinstance(error, KeyError):  # a tag's value PIL has no entry for
        return f"an unknown value {error.args[0]!r} in its header" if error.args else "an unknown value"
    return " ".join(str(error).split()) or type(error).__name__


def check_label(label: np.ndarray, path: Path, image_shape: tuple[int, int]) -> None:
    """Labels must match their image's size and hold only class ids 0..20 or 255."""
    if label.shape != image_shape:
        raise MaskError(
            f"label {path} is {label.shape[1]}x{label.shape[0]} but its image is "
            f"{image_shape[1]}x{image_shape[0]}"
        )
    bad = np.setdiff1d(np.unique(label), np.r_[np.arange(NUM_CLASSES + 1), IGNORE_LABEL])
    if bad.size:
        raise MaskError(f"label {path} has values {bad[:5].tolist()} outside 0..{NUM_CLASSES} and 255")


class VOCTree:
    """A VOC-layout data root. Checks the layout on construction; reads and validates on access."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        missing = [
            p
            for p in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation")
            if not (self.root / p).is_dir()
        ]
        if missing:
            raise NotAVOCTreeError(f"{self.root} is not a VOC tree: missing {', '.join(missing)}/")
        self._samples: dict[str, list[tuple[str, int]]] = {}

    def _benchmark_settings(self) -> tuple[tuple[str, ...], int] | None:
        """The built-in benchmark's class names and image side, from its synthetic.json; None on a tree
        without one (PASCAL). A damaged one is an error: read as PASCAL, the tree would be scored by
        PASCAL's small-object rule without a word."""
        marker = self.root / "synthetic.json"
        if not os.path.lexists(marker):
            return None
        try:
            meta = parse_json(marker.read_text())
            names, side = meta["class_names"], int(meta["image_size"])
            if not MIN_SIDE <= side <= MAX_SIDE:
                raise ValueError(f"image_size {side} is not from {MIN_SIDE} to {MAX_SIDE}")
            if not (
                isinstance(names, list)
                and len(names) == NUM_CLASSES
                and all(isinstance(n, str) for n in names)
            ):
                raise ValueError(f"class_names is not a list of {NUM_CLASSES} names")
        except (OSError, ValueError, KeyError, TypeError, OverflowError) as error:  # Overflow: Infinity
            raise NotAVOCTreeError(
                f"{marker} is damaged ({error}); write the benchmark again (crnet synth) or remove the file"
            ) from None
        return tuple(names), side

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of class ids 1..20: the built-in benchmark's (from its synthetic.json), else PASCAL VOC's."""
        settings = self._benchmark_settings()
        return VOC_CLASS_NAMES if settings is None else settings[0]

    @property
    def min_object_pixels(self) -> int:
        """The small-object rule for this tree: 2048 pixels on PASCAL; on the built-in benchmark the same
        share of the image (2048 / (500 x 375) of its side squared)."""
        settings = self._benchmark_settings()
        if settings is None:
            return MIN_OBJECT_PIXELS
        return max(1, round(MIN_OBJECT_PIXELS * settings[1] ** 2 / VOC_IMAGE_AREA))

    def object_threshold(self, requested: int | None) -> int:
        """Pixels a class needs to count in an image: `requested`, or this tree's rule when None."""
        return self.min_object_pixels if requested is None else requested

    def split_file(self, split: str) -> Path:
        if split not in SPLIT_FILES:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        for name in SPLIT_FILES[split]:
            path = self.root / "ImageSets/Segmentation" / name
            if path.is_file():
                return path
        raise NotAVOCTreeError(
            f"{self.root} has no {' or '.join(SPLIT_FILES[split])} in ImageSets/Segmentation/"
        )

    def check_training_list(self) -> str | None:
        """Refuses a training list that shares images with val.txt (test queries would be trained on).
        Returns a warning where a PASCAL tree trains from VOC's own train.txt: published PASCAL-5i results
        train on VOC with SBD's images (train_aug.txt here), and the fallback used to be silent."""
        train_file, train_ids = self.split_file("train"), self.ids("train")
        has_val = (self.root / "ImageSets/Segmentation/val.txt").is_file()  # training needs none
        val_ids = set(self.ids("val")) if has_val else set()
        shared = [image for image in train_ids if image in val_ids]
        if shared:
            are = "image is" if len(shared) == 1 else f"{len(shared)} images are"
            raise NotAVOCTreeError(
                f"{are} in both {train_file} and val.txt (such as {shared[0]}): training would see the test "
                f"queries; remove {'it' if len(shared) == 1 else 'them'} from {train_file.name}"
            )
        if train_file.name == "train.txt" and self._benchmark_settings() is None:
            return (
                f"training on {train_file} ({len(train_ids)} images), VOC's own list: published PASCAL-5i "
                "results train on VOC with SBD's images (as ImageSets/Segmentation/train_aug.txt here)"
            )
        return None

    def ids(self, split: str) -> list[str]:
        path = self.split_file(split)
        try:
            lines = path.read_text(encoding="utf-8-sig").split()  # a BOM is no part of the first id
        except UnicodeDecodeError as error:  # a binary or wrongly encoded list: no image ids can be read
            raise NotAVOCTreeError(
                f"{path} is not a text list of image ids (byte {error.start} is not UTF-8)"
            ) from None
        if any("\0" in line for line in lines):  # no file name holds one (os.stat refuses it)
            raise NotAVOCTreeError(f"{path} is not a text list of image ids: it holds a NUL byte")
        return sorted(set(lines))

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def label_path(self, image_id: str) -> Path:
        return self.root / "SegmentationClassAug" / f"{image_id}.png"

    def load(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Image (H, W, 3) uint8 and its checked label map (H, W) uint8."""
        image = read_image(self.image_path(image_id))
        label = read_label(self.label_path(image_id))
        check_label(label, self.label_path(image_id), image.shape[:2])
        return image, label

    def class_pixels(self, split: str) -> dict[str, dict[int, int]]:
        """{image id: {class id: pixel count}} for the split, cached on disk after the first scan."""
        return self._index(split)

    def _index(self, split: str) -> dict[str, dict[int, int]]:
        split_file = self.split_file(split)
        ids = self.ids(split)  # read once: the stamp and the scan both need them
        stamp = f"{INDEX_VERSION}:{_fingerprint(split_file.stat())}:{self._labels_stamp(ids)}"
        cache = _index_cache_path(self.root, split)
        if cache.is_file():
            try:
                stored = parse_json(cache.read_text())
                if stored.get("stamp") == stamp:
                    pixels = {k: {int(c): n for c, n in v.items()} for k, v in stored["pixels"].items()}
                    if all(type(n) is int for counts in pixels.values() for n in counts.values()):
                        return pixels
            except (ValueError, KeyError, AttributeError, TypeError):  # ValueError: bad JSON, non-UTF-8
                pass  # a damaged cache is rebuilt
        pixels = {}
        for image_id in ids:
            label = read_label(self.label_path(image_id))
            values, counts = np.unique(label, return_counts=True)
            bad = [int(v) for v in values if v > NUM_CLASSES and v != IGNORE_LABEL]
            if bad:  # said here, naming the file, rather than later as a class with too few images
                raise MaskError(
                    f"label {self.label_path(image_id)} has values {bad[:5]} outside 0..{NUM_CLASSES} and "
                    f"{IGNORE_LABEL}"
                )
            pixels[image_id] = {
                int(v): int(n) for v, n in zip(values, counts, strict=True) if 0 < v <= NUM_CLASSES
            }
        _write_atomic(cache, json.dumps({"stamp": stamp, "pixels": pixels}))
        return pixels

    def _labels_stamp(self, ids: list[str]) -> str:
        """A digest of every label's fingerprint: a label edited in place (the list file unchanged) must not
        leave the cached pixel counts in use, nor one replaced by a file dated earlier (`cp -p`, `rsync -a`
        and `tar x` keep a file's old mtime). A label that cannot be read gives a stamp no cache has, so the
        scan runs and says what is wrong with it."""
        digest = hashlib.sha256()
        try:
            for image_id in ids:
                digest.update(f"{_fingerprint(self.label_path(image_id).stat())}\n".encode())
        except OSError:
            return "unreadable"
        return digest.hexdigest()

    def samples(self, split: str, classes: tuple[int, ...], min_pixels: int = 1) -> list[tuple[str, int]]:
        """Sorted (image id, class) pairs of the split whose label has >= min_pixels of the class."""
        key = f"{split}:{classes}:{min_pixels}"
        if key not in self._samples:
            wanted = set(classes)
            self._samples[key] = sorted(
                (image_id, c)
                for image_id, counts in self._index(split).items()
                for c, n in counts.items()
                if c in wanted and n >= min_pixels
            )
        return self._samples[key]


def _fingerprint(stat: os.stat_result) -> str:
    """What changes when a file is written, replaced or renamed over: its size, its mtime, and its ctime,
    which the kernel sets on every such change and no tool can set back. Not the inode: some network file
    systems number files afresh at each mount, which would rescan every label each time."""
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"


def _index_cache_path(root: Path, split: str) -> Path:
    """Beside the data when the root is writable, else in the user's cache directory."""
    if os.access(root, os.W_OK):
        return root / f".crnet_index_{split}.json"
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    configured = os.environ.get("XDG_CACHE_HOME", "")
    # Unset, empty or relative: the default, as the XDG rule says (an empty one put it in the working folder)
    base = (Path(configured) if os.path.isabs(configured) else Path.home() / ".cache") / "crnet"
    return base / f"index_{digest}_{split}.json"


def _write_atomic(path: Path, text: str) -> None:
    """The index is a cache: where it cannot be written (a full disk, say) the scan is simply redone."""
    with contextlib.suppress(OutputError):
        write_text(path, text)
