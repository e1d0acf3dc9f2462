"""A dilated convolution computed without the taps that only ever read its zero padding.

The ASPP's 3x3 branches have dilations 6, 12 and 18 on a 41x41 feature map (the paper's 321x321 input) and
padding equal to the dilation, so many of their taps read padding: output row i's tap a (-1, 0, +1) reads row
i + a * d, which is outside the map for the top d rows (a = -1) and the bottom d rows (a = +1). Along one
axis a dilation-18 kernel reads the map in 87 of its 123 row-taps, so in 2-D only half of its multiply-adds
meet a pixel; at dilation 12 it is 65%, at 6 81%: together 9.4 of the 77 (256x256) matrix products of one
refinement iteration multiply zeros, unless the convolution library skips them itself. On a CPU oneDNN
appears to (its padded convolution costs less the wider the dilation), and there this form is slower
(benchmarks/banded_aspp.py, docs/BENCHMARKS.md): an option for GPUs, measured there.

Here the output is cut into blocks whose pixels read the map with the same taps (along each axis: the rows
before d, the rows after size - d, and those between) and each block is a convolution of the map's slice it
reads with just those taps and no padding. The result is the same sum without its zero terms, so it is
exact (up to summation order). The price is more, smaller convolutions (9 for each branch at 41x41), one
pass to put the blocks together, and a copy of each block's slice: PyTorch's cuDNN convolutions make their
input contiguous first (`cudnn_convolution_relu` in aten/src/ATen/native/cudnn/ConvShared.cpp), and the
slices overlap, 7.6 times the map at dilation 18, 4.7 at 12, 2.5 at 6. By that arithmetic the copies may
cost as much as the skipped taps save, or more; it is measured, not assumed (`+banded-aspp`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crnet.model.conv_epilogues import ConvReLU, conv_bias_relu
from crnet.model.conv_twin import conv_twin, layout_of
from crnet.model.refinement import ASPP


def tap_bands(size: int, kernel: int, dilation: int, padding: int) -> list[tuple[int, int, int, int]]:
    """Along one axis of a stride-1 convolution: (first output, end output, first tap, end tap) for each run
    of outputs that read the input with the same taps, in order; a run may have no tap (first == end tap)."""
    outputs = size + 2 * padding - dilation * (kernel - 1)
    bands: list[tuple[int, int, int, int]] = []
    for out in range(outputs):
        valid = [t for t in range(kernel) if 0 <= out - padding + t * dilation < size]
        taps = (valid[0], valid[-1] + 1) if valid else (0, 0)
        if bands and bands[-1][2:] == taps:
            bands[-1] = (bands[-1][0], out + 1, *taps)
        else:
            bands.append((out, out + 1, *taps))
    return bands


class BandedConv(nn.Conv2d):
    """A stride-1 Conv2d (same parameters, same state-dict keys) that skips the taps reading its zero
    padding; made from a ConvReLU, it keeps the ReLU in each block's convolution. Each block's slice of the
    weight is cut once, for the feature size given (copies, like BatchNorm folding's: an inference form);
    another size cuts its slices on every call."""

    @classmethod
    def of(cls, conv: nn.Conv2d, size: tuple[int, int]) -> BandedConv:
        if (
            tuple(conv.stride) != (1, 1)
            or conv.groups != 1
            or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str)
        ):
            raise ValueError(f"banding takes a plain stride-1 convolution, not {conv}")
        banded = conv_twin(cls, conv)
        banded.relu = isinstance(conv, ConvReLU)
        banded.size = tuple(size)
        for rows, cols in banded._blocks(banded.size):
            taps = (*rows[2:], *cols[2:])
            if taps[0] < taps[1] and taps[2] < taps[3]:
                weight = conv.weight.detach()[:, :, taps[0] : taps[1], taps[2] : taps[3]].clone()
                banded.register_buffer(_name(taps), weight, persistent=False)
        return banded

    def _blocks(self, size) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        rows, cols = (
            tap_bands(*axis) for axis in zip(size, self.kernel_size, self.dilation, self.padding, strict=True)
        )
        return [(r, c) for r in rows for c in cols]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self._blocks(x.shape[2:])
        columns = len(blocks) // len({rows for rows, _ in blocks})
        layout = layout_of(x)  # each block's output in the input's layout, so that the joins keep it
        outs = [self._block(x, rows, cols).contiguous(memory_format=layout) for rows, cols in blocks]
        lines = [torch.cat(outs[i : i + columns], dim=3) for i in range(0, len(outs), columns)]
        return torch.cat(lines, dim=2)

    def _block(self, x: torch.Tensor, rows: tuple[int, ...], cols: tuple[int, ...]) -> torch.Tensor:
        """The outputs rows[0]:rows[1] x cols[0]:cols[1], from the taps rows[2]:rows[3] x cols[2]:cols[3]."""
        (r0, r1, a0, a1), (c0, c1, b0, b1) = rows, cols
        (dy, dx), (py, px) = self.dilation, self.padding
        if a0 == a1 or b0 == b1:  # no tap reads the map: the bias alone
            shape = (x.shape[0], self.out_channels, r1 - r0, c1 - c0)
            out = x.new_zeros(shape) if self.bias is None else self.bias.view(1, -1, 1, 1).expand(shape)
            return out.relu() if self.relu else out
        # Output i's tap t reads input i - padding + t * dilation: the block reads a slice with no padding.
        window = x[
            :, :, r0 - py + a0 * dy : r1 - py + (a1 - 1) * dy, c0 - px + b0 * dx : c1 - px + (b1 - 1) * dx
        ]
        taps = (a0, a1, b0, b1)
        if tuple(x.shape[2:]) == self.size:
            weight = getattr(self, _name(taps))
        else:
            weight = self.weight[:, :, a0:a1, b0:b1]
        if self.relu:
            return conv_bias_relu(window, weight, self.bias, None, [1, 1], [0, 0], list(self.dilation))
        return F.conv2d(window, weight, self.bias, 1, 0, self.dilation)


def _name(taps: tuple[int, int, int, int]) -> str:
    return "taps_{}{}_{}{}".format(*taps)


def band_aspp(model: nn.Module, size: tuple[int, int]) -> nn.Module:
    """Compute the dilated ASPP branches of `model` as BandedConv for `size` feature maps, in place; an
    inference transform like folding, applied after conv_epilogues.fuse_conv_epilogues where both are.
    Returns the model."""
    for module in model.modules():
        if isinstance(module, ASPP):
            module.branches = nn.ModuleList(
                branch
                if max(branch.dilation) == 1 or isinstance(branch, BandedConv)
                else BandedConv.of(branch, size)
                for branch in module.branches
            )
    return model
