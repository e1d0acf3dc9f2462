"""BatchNorm folded into the convolution before it, for inference.

In eval mode BatchNorm is an affine map per channel, y = s * x + t with s = gamma / sqrt(var + eps) and
t = beta - mean * s, so conv followed by BN is one conv with weights W * s and bias b * s + t: one kernel
and one pass over memory fewer per pair (the trunk of r50 has 53 such pairs). Computed in float64, then
stored in the conv's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from crnet.model.backbone import Bottleneck, ResNetTrunk


@torch.no_grad()
def fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Make `conv` compute conv then `norm` (with its running statistics); `norm` is left to be dropped."""
    scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    shift = norm.bias.double() - norm.running_mean.double() * scale
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    conv.weight.copy_((conv.weight.double() * scale[:, None, None, None]).to(conv.weight.dtype))
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm of the ResNet trunks in `model` into its convolution, in place; the model must
    be in eval mode (folding freezes the running statistics). Returns the model."""
    if model.training:
        raise ValueError("fold BatchNorm into an eval-mode model: training updates its statistics")
    for module in model.modules():
        pairs = []
        if isinstance(module, ResNetTrunk):
            pairs.append(("conv1", "bn1"))
        elif isinstance(module, Bottleneck):
            pairs += [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
            if module.downsample is not None and isinstance(module.downsample[1], nn.BatchNorm2d):
                fold_into(module.downsample[0], module.downsample[1])
                module.downsample[1] = nn.Identity()
        for conv, norm in pairs:
            if isinstance(getattr(module, norm), nn.BatchNorm2d):
                fold_into(getattr(module, conv), getattr(module, norm))
                setattr(module, norm, nn.Identity())
    return model
