"""The encoder's neck on chunks of the batch (`+chunked-neck`): the same function, one call per chunk of at
most CHUNK_IMAGES images, their outputs joined along the batch.

Why: cuDNN picks a convolution's kernel from its shape, the batch included. The neck's layer3 half (a 3x3
convolution, dilation 2, over 1024 channels of 41x41 maps) ran an sm90 kernel on the H200 with 2 to 16
images and an sm80 one with the 128 images of a batch-64 episode (2.54 ms, a tenth of the episode). Alone
(benchmarks/neck_shapes.py, 2026-11-27), the deployed neck on chunks of 16 images took 3.13 ms for 128
images against 3.96 in one call (1.27x), and 1.57 against 1.94 for 64; chunks of 32 or 64 images were
slower than one call. A batch slice of a map is dense in either memory format, so the chunks cost no copy
in, and one concatenation out. At up to CHUNK_IMAGES images the neck is called as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from crnet.model.backbone import Encoder

CHUNK_IMAGES = 16


class ChunkedNeck(nn.Module):
    """`neck(layer2, layer3)` on chunks of at most `images` images, in order, into one output."""

    def __init__(self, neck: nn.Module, images: int):
        super().__init__()
        if images < 1:
            raise ValueError(f"a chunk holds at least one image, got {images}")
        self.neck, self.images = neck, images

    def forward(self, layer2: torch.Tensor, layer3: torch.Tensor) -> torch.Tensor:
        if len(layer2) <= self.images:
            return self.neck(layer2, layer3)
        chunks = zip(layer2.split(self.images), layer3.split(self.images), strict=True)
        return torch.cat([self.neck(a, b) for a, b in chunks])


def chunked_neck(model: nn.Module, images: int | None = None) -> nn.Module:
    """Every encoder's neck (in whatever form) run on chunks of at most `images` images (CHUNK_IMAGES if
    None), in place; an inference transform (its parameters' names gain `neck.`). Returns the model."""
    images = CHUNK_IMAGES if images is None else images
    for module in list(model.modules()):
        if isinstance(module, Encoder) and not isinstance(module.neck, ChunkedNeck):
            module.neck = ChunkedNeck(module.neck, images)
    return model
