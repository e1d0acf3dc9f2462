"""A convolution's inference form as another Conv2d subclass that shares its parameters (so its state-dict
keys too): the fused-epilogue convolutions (conv_epilogues.py) and the stem over pixel blocks
(space_to_depth.py) are built this way."""

from __future__ import annotations

from torch import nn


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
