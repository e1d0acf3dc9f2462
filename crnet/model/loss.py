"""The training loss: cross-entropy of the query prediction plus that of the support prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crnet.data.pascal import IGNORE_LABEL
from crnet.model.crnet import upsample


def episode_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at mask resolution, ignore label kept out. logits (N, 2, h, w), masks (N, H, W).
    An episode's loss is this on the query plus this on its supports (CRNet predicts both)."""
    return F.cross_entropy(upsample(logits.float(), masks.shape[-2:]), masks, ignore_index=IGNORE_LABEL)
