"""The trunk's stem, a 7x7 convolution of stride 2 over 3 colours, as a 4x4 convolution of stride 1 over 2x2
blocks of pixels: the same arithmetic, in a shape the GPU's convolution kernels are built for.

With the kernel padded by a zero row and column to 8x8, tap (u, v) = (2a + p, 2b + q) of a stride-2
convolution reads padded pixel (2(i + a) + p, 2(j + b) + q): pixel (i + a, j + b) of the block map whose
channel (c, p, q) holds pixel (2y + p, 2x + q) of colour c. So conv(x, W, stride 2) = conv(blocks(x), W',
stride 1), with W'[o, (c, p, q), a, b] = W[o, c, 2a + p, 2b + q] (zero at 7), exactly, up to summation order.

Why: over 3 colours the stem cannot feed tensor cores whole 16-byte vectors, so cuDNN pads the image to 8
channels in a kernel of its own and then runs a strided 7x7 kernel. On the H200 at batch 64 (128 images of
321x321, FP16, channels-last) the stem's kernel took 1.34 ms for its 62 GFLOP in the cuDNN-epilogue row's
episode of 31 ms (the kernel the batch-1 profile runs once for the stem), and the anchor's largest single
call, 3.09 ms, ran beside 12 calls of cuDNN's channel-padding kernel
(docs/results/h200_profile_2026-11-26.txt). The block map has 4 x 4 = 16 channels (colours padded to 4
with zeros): a plain stride-1 convolution with K = 256, the shape of the trunk's other layers.
The price is zero taps: 8 x 8 x 4 = 256 multiply-adds per output value against 7 x 7 x 3 = 147 (but 392
for the 8 channels cuDNN pads the colours to), and one pass over the input to rearrange it. On a CPU it is
slower (benchmarks/stem.py): an option for GPUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crnet.model.backbone import ResNetTrunk
from crnet.model.conv_twin import conv_twin, layout_of

# Channels of the block map are whole 16-byte vectors of FP16: colours are padded to a multiple of this / 4.
ALIGNED_CHANNELS = 8


def space_to_depth(x: torch.Tensor, block_height: int, block_width: int, channels: int) -> torch.Tensor:
    """(N, C, 2h, 2w) -> (N, 4 * channels, h, w): channel c * 4 + p * 2 + q holds pixel (2y + p, 2x + q) of
    channel c; channels C..channels-1 are zeros. Keeps the input's memory format."""
    blocks = x.unflatten(2, (block_height, 2)).unflatten(4, (block_width, 2))  # N, C, h, 2, w, 2
    blocks = blocks.permute(0, 1, 3, 5, 2, 4).flatten(1, 3)  # N, C * 4, h, w
    if channels > x.shape[1]:
        blocks = F.pad(blocks, (0, 0, 0, 0, 0, 4 * (channels - x.shape[1])))
    return blocks.contiguous(memory_format=layout_of(x))


class SpaceToDepthConv(nn.Conv2d):
    """A stride-2 Conv2d (same parameters, same state-dict keys) computed as a stride-1 convolution over 2x2
    pixel blocks. Its rearranged weight is a copy made once, like BatchNorm folding's: an inference form."""

    @classmethod
    def of(cls, conv: nn.Conv2d) -> SpaceToDepthConv:
        if (
            tuple(conv.stride) != (2, 2)
            or tuple(conv.dilation) != (1, 1)
            or conv.groups != 1
            or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str)
        ):
            raise ValueError(f"space-to-depth takes a plain stride-2 convolution, not {conv}")
        blocked = conv_twin(cls, conv)
        blocked.channels = -(-conv.in_channels * 4 // ALIGNED_CHANNELS) * ALIGNED_CHANNELS // 4
        weight = conv.weight.detach()
        kernel = [size + size % 2 for size in conv.kernel_size]  # even: whole 2x2 blocks of taps
        extra = (kernel[1] - weight.shape[3], kernel[0] - weight.shape[2], blocked.channels - weight.shape[1])
        weight = F.pad(weight, (0, extra[0], 0, extra[1], 0, extra[2]))  # zero taps and colours
        weight = weight.unflatten(2, (kernel[0] // 2, 2)).unflatten(4, (kernel[1] // 2, 2))  # O,C,a,p,b,q
        weight = weight.permute(0, 1, 3, 5, 2, 4).flatten(1, 3)  # O, (c, p, q), a, b
        blocked.register_buffer("blocked_weight", weight.contiguous(), persistent=False)
        return blocked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Padded so that the block map's stride-1 output has exactly the stride-2 output's size:
        # (out + taps - 1) blocks per side; the far side's extra rows only ever meet zero taps.
        taps = self.blocked_weight.shape[2:]
        padded = []
        for size, pad, kernel, block_taps in zip(
            x.shape[2:], self.padding, self.kernel_size, taps, strict=True
        ):
            out = (size + 2 * pad - kernel) // 2 + 1
            padded.append((pad, 2 * (out + block_taps - 1) - size - pad))
        x = F.pad(x, (*padded[1], *padded[0]))
        blocks = space_to_depth(x, x.shape[2] // 2, x.shape[3] // 2, self.channels)
        return F.conv2d(blocks, self.blocked_weight, self.bias)


def space_to_depth_stem(model: nn.Module) -> nn.Module:
    """Run every ResNet trunk's stem of `model` over 2x2 pixel blocks, in place; an inference transform like
    folding (its weight is rearranged once). Returns the model."""
    for module in model.modules():
        if isinstance(module, ResNetTrunk) and not isinstance(module.conv1, SpaceToDepthConv):
            module.conv1 = SpaceToDepthConv.of(module.conv1)
    return model
