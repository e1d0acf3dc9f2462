"""A convolution's inference form as another Conv2d subclass that shares its parameters (so its state-dict
keys too): the fused-epilogue convolutions (conv_epilogues.py), the stem over pixel blocks
(space_to_depth.py) and the banded ASPP branches (banded_conv.py) are built this way, and keep the memory
format they are given."""

from __future__ import annotations

import torch
from torch import nn


def layout_of(*tensors: torch.Tensor) -> torch.memory_format:
    """Channels-last when any of these 4-D tensors is (and is not also plain contiguous, as a tensor with one
    channel or one pixel is both), else contiguous."""
    channels_last = any(
        t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        for t in tensors
    )
    return torch.channels_last if channels_last else torch.contiguous_format


def keeps_size(conv: nn.Conv2d) -> bool:
    """Whether `conv` maps a map to one of the same size (stride 1, ungrouped, padding d * (k - 1) / 2 on
    each axis): what the inference forms that run several such convolutions as one call take."""
    return (
        conv.stride == (1, 1)
        and conv.groups == 1
        and not isinstance(conv.padding, str)
        and all(
            2 * p == d * (k - 1)
            for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size, strict=True)
        )
    )


def conv_twin(cls: type[nn.Conv2d], conv: nn.Conv2d) -> nn.Conv2d:
    """An instance of `cls` with `conv`'s geometry and its very parameters, in its training mode."""
    twin = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
        device="meta",  # no storage: the parameters are conv's
    )
    twin.weight, twin.bias = conv.weight, conv.bias
    return twin.train(conv.training)
