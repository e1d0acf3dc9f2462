"""Condition module: fuse an image's features with the other image's foreground prototype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Keeps an empty mask's prototype at zero instead of 0/0 = NaN.
MASK_EPSILON = 1e-5


def foreground(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) labels {0, 1, 255} -> (N, 1, H, W) float foreground; ignore counts as background."""
    return (mask == 1).unsqueeze(1).float()


def pooling_weights(weights: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Image-sized (N, 1, H, W) weights as the pooling reads them at the features' (h, w): sampled on a
    grid (every 8th pixel at stride 8), so an object between the grid's points weighs nothing."""
    return F.interpolate(weights.float(), size=size, mode="bilinear", align_corners=True)


def weighted_average_pool(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of the features under image-sized (N, 1, H, W) weights -> (N, C), in FP32 whatever the
    features' dtype (a 41x41 sum overflows FP16 precision); zero where the weights are all zero."""
    weights = pooling_weights(weights, features.shape[-2:])
    total = (features.float() * weights).sum(dim=(2, 3))
    return (total / (weights.sum(dim=(2, 3)) + MASK_EPSILON)).to(features.dtype)


def masked_average_pool(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the features under the mask: (N, C, h, w), (N, H, W) -> (N, C). Zero for an empty mask."""
    return weighted_average_pool(features, foreground(mask))


class Condition(nn.Module):
    """Tile the prototype, concatenate with the features, 3x3 conv (dilation 2) to C; then, as configured,
    ReLU and Dropout2d (CaNet's `layer55`) and a residual block."""

    def __init__(
        self, channels: int, *, activation: bool = False, dropout: float = 0.0, residual: bool = True
    ):
        super().__init__()
        self.fuse = nn.Conv2d(2 * channels, channels, 3, padding=2, dilation=2)
        self.activation, self.dropout = activation, dropout
        self.residual = None
        if residual:
            self.residual = nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1),
            )

    def forward(self, features: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
        tiled = prototype[:, :, None, None].expand_as(features)
        x = self.fuse(torch.cat([features, tiled], dim=1))
        if self.activation:
            x = F.relu(x)
        if self.dropout:
            x = F.dropout2d(x, self.dropout, self.training)
        return x if self.residual is None else x + self.residual(x)
