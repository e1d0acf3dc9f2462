"""A tiny hand-built VOC tree with known contents, for tests of the PASCAL loader, episodes and the CLI.

Every label is background (0) with non-overlapping axis-aligned rectangles of class ids, optionally inside a
1-pixel ignore (255) frame. The ground truth (which classes each image holds, and how many pixels) is worked
out from the rectangle sizes, not by reading the files back, so tests compare the loader with it.

Fold 0 is usable in both splits: every base class 6..20 appears in >= 2 train images, every novel class 1..5
in >= 2 val images. Class 6 appears in exactly one val image (a "thin" class), val class 2 has a 1-pixel
instance and val class 5 a 4-pixel one (for min_pixels), and one val image has no object at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE = 255


@dataclass(frozen=True)
class FakeImage:
    id: str
    split: str  # "train" or "val"
    size: tuple[int, int]  # (width, height)
    border: bool  # 1-pixel ignore frame
    palette: bool  # label stored as mode "P" (else "L")
    rects: tuple[tuple[int, int, int, int, int], ...]  # (class, x, y, w, h)

    @property
    def shape(self) -> tuple[int, int]:
        return self.size[1], self.size[0]

    def pixels(self) -> dict[int, int]:
        """{class: pixel count}, from the rectangle areas (rectangles never overlap, see `label`)."""
        counts: dict[int, int] = {}
        for c, _, _, w, h in self.rects:
            counts[c] = counts.get(c, 0) + w * h
        return counts

    def label(self) -> np.ndarray:
        """The (H, W) uint8 label map this image is written with."""
        label = np.zeros(self.shape, dtype=np.uint8)
        if self.border:
            label[0, :] = label[-1, :] = label[:, 0] = label[:, -1] = IGNORE
        for c, x, y, w, h in self.rects:
            box = label[y : y + h, x : x + w]
            # Guards on the spec itself: rectangles inside the frame and disjoint, so `pixels` is exact.
            assert box.shape == (h, w) and (box == 0).all(), f"{self.id}: rectangle {c} overlaps or leaves"
            box[:] = c
        return label

    def image(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB: a left-to-right ramp (so a mirror image differs) plus the label's shapes."""
        height, width = self.shape
        ramp = np.linspace(0, 200, width, dtype=np.float64)[None, :].repeat(height, 0)
        label = self.label().astype(np.float64)
        rgb = np.stack([ramp, (label * 11) % 256, 255 - ramp * 0.5], axis=-1)
        return rgb.round().clip(0, 255).astype(np.uint8)


def _img(index: int, split: str, size, border, palette, *rects) -> FakeImage:
    return FakeImage(f"2008_{index:06d}", split, size, border, palette, tuple(rects))


# All ids have the same length, so replacing one id in a split file keeps the file's size.
IMAGES: tuple[FakeImage, ...] = (
    # train: base classes 6..20 of fold 0, each in exactly two images; class 1 once.
    _img(1, "train", (40, 30), True, False,
         (6, 2, 2, 10, 8), (7, 14, 2, 10, 8), (8, 2, 12, 10, 10), (9, 26, 14, 10, 10)),
    _img(2, "train", (50, 50), False, True,
         (10, 0, 0, 20, 20), (11, 25, 0, 25, 10), (12, 0, 30, 15, 20), (13, 30, 30, 20, 20)),
    _img(3, "train", (30, 40), True, False,
         (14, 1, 1, 5, 5), (15, 10, 1, 10, 6), (16, 1, 20, 8, 8), (17, 15, 25, 10, 10)),
    _img(4, "train", (48, 36), False, True,
         (18, 0, 0, 12, 12), (19, 20, 0, 12, 6), (20, 0, 20, 30, 10), (6, 40, 20, 8, 16)),
    _img(5, "train", (40, 30), True, False,
         (7, 1, 1, 6, 6), (8, 10, 1, 6, 7), (9, 1, 15, 9, 9), (10, 20, 15, 15, 12)),
    _img(6, "train", (50, 50), True, True,
         (11, 1, 1, 12, 12), (12, 20, 1, 11, 11), (13, 1, 20, 7, 7), (14, 20, 20, 25, 25)),
    _img(7, "train", (30, 40), False, False,
         (15, 0, 0, 6, 6), (16, 10, 0, 10, 10), (17, 0, 15, 12, 12), (18, 15, 15, 15, 20)),
    _img(8, "train", (48, 36), True, False, (19, 1, 1, 13, 13), (20, 20, 1, 14, 9), (1, 1, 20, 20, 10)),
    # val: novel classes 1..5 of fold 0, each in >= 2 images; class 6 once; tiny instances of 2 and 5.
    _img(9, "val", (40, 30), True, False, (1, 2, 2, 10, 8), (2, 15, 2, 6, 5), (3, 25, 15, 4, 4)),
    _img(10, "val", (50, 50), False, True, (1, 0, 0, 12, 12), (4, 20, 20, 10, 10), (5, 40, 40, 2, 2)),
    _img(11, "val", (30, 40), True, False,
         (2, 1, 1, 8, 8), (3, 12, 1, 9, 9), (5, 1, 20, 10, 5), (6, 20, 30, 3, 3)),
    _img(12, "val", (48, 36), False, True, (4, 0, 0, 7, 7), (5, 10, 10, 8, 8), (2, 47, 35, 1, 1)),
    _img(13, "val", (36, 28), True, False),  # background and ignore only
)  # fmt: skip

TRUTH: dict[str, dict[int, int]] = {image.id: image.pixels() for image in IMAGES}
BY_ID: dict[str, FakeImage] = {image.id: image for image in IMAGES}
SPLIT_FILES = {"train": "train_aug.txt", "val": "val.txt"}
VOC_PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 151) % 256)]


def ids(split: str) -> list[str]:
    return sorted(image.id for image in IMAGES if image.split == split)


def truth(split: str) -> dict[str, dict[int, int]]:
    """{image id: {class: pixels}} of a split, as VOCTree.class_pixels should report it."""
    return {image_id: TRUTH[image_id] for image_id in ids(split)}


def save_label(label: np.ndarray, path: Path, palette: bool = False) -> None:
    image = Image.fromarray(label.astype(np.uint8))
    if palette:
        image.putpalette(VOC_PALETTE)  # mode "P" with the class ids as palette indices
    image.save(path)


def make_fake_voc(root: str | Path, *, train_file: str = "train_aug.txt") -> Path:
    """Write the tree under `root` and return it. Split files list ids unsorted, one with a duplicate,
    to exercise VOCTree.ids()."""
    root = Path(root)
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image in IMAGES:
        Image.fromarray(image.image()).save(
            root / "JPEGImages" / f"{image.id}.jpg", quality=95, subsampling=0
        )
        save_label(image.label(), root / "SegmentationClassAug" / f"{image.id}.png", image.palette)
    lists = root / "ImageSets/Segmentation"
    train = ids("train")
    (lists / train_file).write_text("\n".join([*reversed(train), train[0]]) + "\n")
    (lists / "val.txt").write_text("\n".join(reversed(ids("val"))) + "\n")
    return root
