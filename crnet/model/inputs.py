"""Checks of what a caller hands the model and the runtimes: one line that names the argument, instead of an
error deep inside a convolution or, worse, a wrong result (0/255 masks gave an empty prompt in silence).

Shapes, dtypes and types are metadata, free to read. Mask values are read only where the masks are on the
CPU: on a GPU the read would make every call wait for the device (the CLI reads masks from files and checks
them there, crnet.data.masks).
"""

from __future__ import annotations

import warnings

import torch

from crnet.config import feature_side
from crnet.errors import InputError, MaskError, ZeroPromptWarning


def _tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _shape(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(map(str, tensor.shape)) + ")"


def check_images(images, name: str = "images", size: int | None = None, dims: str = "N") -> None:
    """(N, 3, H, W) floating-point images, normalised as crnet.data.episodes.to_model_input does (RGB in
    0..1, less ImageNet's mean, over its std); H = W = `size` where a runtime is built for one size. `dims`
    names the leading dimensions ("B, K" for support images)."""
    shape, leading = _tensor(images, name).shape, dims.count(",") + 1  # read once: it runs every call
    if len(shape) != leading + 3 or shape[leading] != 3:
        raise InputError(f"{name} must be ({dims}, 3, H, W) RGB images, got {_shape(images)}")
    if not images.is_floating_point():
        raise InputError(
            f"{name} are {images.dtype}: pass floating-point images normalised like ImageNet "
            "(crnet.data.episodes.to_model_input), not raw pixel values"
        )
    if size is not None and (shape[-2] != size or shape[-1] != size):
        raise InputError(f"{name} are {shape[-2]}x{shape[-1]}; this runtime takes {size}x{size}")


def check_features(features, dims: str, name: str = "features") -> None:
    """Floating-point features with the named dims, e.g. "B, C, h, w"."""
    features = _tensor(features, name)
    if features.ndim != len(dims.split(",")) or not features.is_floating_point():
        raise InputError(
            f"{name} must be floating-point ({dims}) features, got {features.dtype} {_shape(features)}"
        )


def check_support_masks(
    supports: torch.Tensor,
    masks,
    size: int | None = None,
    say_empty: bool = True,
    stacklevel: int = 3,
    side: int | None = None,
) -> None:
    """(B, K, H, W) masks of 0, 1 and 255 for (B, K, ...) support features or images, H = W = `size` where
    a runtime is built for one size. A mask without a 1 gives a zero prototype, and so does one whose object
    lies between the points the pooling samples on the `side` x `side` feature grid: said in a warning where
    `say_empty` (not an error: a small object can vanish in a resize)."""
    shape = _tensor(masks, "support masks").shape
    if len(shape) != 4 or shape[:2] != supports.shape[:2]:
        raise InputError(
            f"support masks must be (B, K, H, W) for supports of (B, K) = {tuple(supports.shape[:2])}, "
            f"got {_shape(masks)}"
        )
    if size is not None and (shape[2] != size or shape[3] != size):
        raise InputError(f"support masks are {shape[2]}x{shape[3]}; this runtime takes {size}x{size}")
    if not masks.is_cpu:
        return
    objects = masks == 1  # compares, not torch.unique: 0.3 ms against 2.9 at 321x321 on CPU-2c
    allowed = objects | (masks == 0) | (masks == 255)
    if not allowed.all():
        bad = torch.unique(masks[~allowed])[:5].tolist()
        raise MaskError(
            f"support masks hold {bad}; a mask holds only 0 (background), 1 (object) and 255 (ignore)"
        )
    if not say_empty:
        return
    if not objects.flatten(2).any(2).all():
        warnings.warn(
            "a support mask marks no object pixel (value 1), so its prompt is zero (255 means ignore: a mask "
            "of 0 and 255 must be divided by 255)",
            ZeroPromptWarning,
            stacklevel=stacklevel,  # the caller's line: 3 from a prompt()
        )
    elif side is not None and not pooled_objects(objects.flatten(0, 1), side).all():
        warnings.warn(
            f"a support mask's object lies between the points the prompt samples on the {side}x{side} "
            f"feature grid (one every {stride(shape[-1], side)} pixels), so its prompt is zero: give a "
            "larger object or a larger input",
            ZeroPromptWarning,
            stacklevel=stacklevel,
        )


def pooled_objects(objects: torch.Tensor, side: int) -> torch.Tensor:
    """(N, H, W) booleans (or 0/1 labels) -> (N,) whether the object keeps any weight at the `side` x `side`
    grid the prototype's pooling reads (condition.pooling_weights)."""
    from crnet.model.condition import pooling_weights

    weights = pooling_weights((objects == 1)[:, None], (side, side))
    return weights.flatten(1).sum(1) > 0


def stride(size: int, side: int) -> str:
    """The pooling grid's spacing in pixels, as a word for messages ("8", or "7.5")."""
    step = (size - 1) / max(side - 1, 1)
    return f"{step:g}"


def check_episode(query, supports, masks, size: int | None = None) -> None:
    """Query images (B, 3, S, S), support images (B, K, 3, S, S) and their masks (B, K, S, S)."""
    check_images(query, "query images", size)
    check_images(supports, "support images", size, dims="B, K")
    if supports.shape[0] != len(query) or supports.shape[1] == 0:
        raise InputError(
            f"support images must be (B, K, 3, H, W) with K >= 1 for {query.shape[0]} queries, got "
            f"{_shape(supports)}"
        )
    side = feature_side(masks.shape[-1]) if _tensor(masks, "support masks").ndim == 4 else None
    check_support_masks(supports, masks, size, stacklevel=4, side=side)  # the line that called episode()


def check_prompt(prompt, batch: int, channels: int | None = None) -> None:
    """A SupportPrompt for `batch` queries (of features with `channels` channels, where known): one per
    query, or one for all."""
    from crnet.model.crnet import SupportPrompt

    if not isinstance(prompt, SupportPrompt):
        raise InputError(
            f"prompt must be the SupportPrompt that prompt() returns, got {type(prompt).__name__}"
        )
    vector, prototype = _tensor(prompt.vector, "prompt.vector"), _tensor(prompt.prototype, "prompt.prototype")
    if vector.shape != prototype.shape or vector.ndim != 2 or vector.shape[0] not in (1, batch):
        raise InputError(
            f"prompt of vector {_shape(vector)} and prototype {_shape(prototype)} does not fit {batch} "
            f"queries: both must be (1 or {batch}, C)"
        )
    if channels is not None and vector.shape[1] != channels:
        raise InputError(f"prompt has {vector.shape[1]} channels and the query features {channels}")


def check_exit_fraction(exit_fraction: float) -> None:
    if not 0.0 <= exit_fraction <= 1.0:  # also refuses NaN
        raise InputError(f"exit_fraction must be from 0 to 1, got {exit_fraction}")
