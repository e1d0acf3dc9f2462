"""Cross-reference module: keep the channels that fire in both the support and the query image."""

from __future__ import annotations

import torch
from torch import nn


class CrossReference(nn.Module):
    """Per branch v = sigmoid(conv1x1(GAP(F))); the common vector is c = v_support * v_query."""

    def __init__(self, channels: int):
        super().__init__()
        self.support_gate = nn.Conv2d(channels, channels, 1)
        self.query_gate = nn.Conv2d(channels, channels, 1)

    @staticmethod
    def _vector(gate: nn.Conv2d, features: torch.Tensor) -> torch.Tensor:
        pooled = features.float().mean(dim=(2, 3), keepdim=True).to(features.dtype)  # FP32 reduction
        return torch.sigmoid(gate(pooled)).flatten(1)

    def support_vector(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) support features -> (N, C) channel importance."""
        return self._vector(self.support_gate, features)

    def query_vector(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) query features -> (N, C) channel importance."""
        return self._vector(self.query_gate, features)
