"""User-supplied support masks: binary PNGs with 0 = background, 1 = object, 255 = ignore."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from crnet.data.pascal import IGNORE_LABEL, read_label
from crnet.errors import CRNetWarning, EmptySupportMaskError, MaskError, NoSupportError

ALLOWED_VALUES = (0, 1, IGNORE_LABEL)


def check_binary_mask(
    mask: np.ndarray | torch.Tensor, image_shape: tuple[int, int], name: str = "mask"
) -> None:
    """Raise MaskError unless the mask is image-sized with values in {0, 1, 255}, and
    EmptySupportMaskError when it marks no object pixel."""
    # Tensors stay on their device; arrays are copied (np.array) because torch warns on read-only ones,
    # and PIL-decoded masks are read-only.
    mask = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.array(mask))
    if tuple(mask.shape) != tuple(image_shape):
        raise MaskError(f"{name} is {_size(mask.shape)} but its image is {_size(image_shape)}")
    values = torch.unique(mask).tolist()
    bad = [v for v in values if v not in ALLOWED_VALUES]
    if bad:
        raise MaskError(
            f"{name} has values {bad[:5]}; a mask holds only 0 (background), 1 (object), 255 (ignore)"
        )
    if 1 not in values:
        raise EmptySupportMaskError(f"{name} marks no object pixel (no value 1), so it defines no prototype")


def read_binary_mask(path: str | Path, image_shape: tuple[int, int]) -> np.ndarray:
    """A checked support mask from a single-channel PNG, turned by its EXIF orientation if it has one (as
    its image is: read_image(as_shown=True))."""
    if Path(path).suffix.lower() in (".jpg", ".jpeg"):
        warnings.warn(
            f"mask {path} is a JPEG: its lossy compression changes mask pixels; save masks as PNG",
            CRNetWarning,
            stacklevel=2,
        )
    mask = read_label(Path(path), as_shown=True, binary=True)
    check_binary_mask(mask, image_shape, name=f"mask {path}")
    return mask


def check_support_set(images: torch.Tensor, masks: torch.Tensor) -> None:
    """(B, K, 3, H, W) images and (B, K, H, W) masks: at least one shot, every mask usable."""
    if images.ndim != 5 or masks.ndim != 4 or images.shape[:2] != masks.shape[:2]:
        raise MaskError(f"support images {tuple(images.shape)} and masks {tuple(masks.shape)} do not pair up")
    if images.shape[1] == 0:
        raise NoSupportError("an episode needs at least one support image")
    for b in range(masks.shape[0]):
        for k in range(masks.shape[1]):
            check_binary_mask(masks[b, k], tuple(images.shape[-2:]), name=f"support mask {k} of episode {b}")


def _size(shape) -> str:
    return f"{shape[-1]}x{shape[-2]}"
