"""Siamese encoder: ResNet-50 through layer3 (layer3 dilated, output stride 8) plus a fusion neck.

Module and parameter names follow torchvision's `resnet50` (torchvision/models/resnet.py), so its ImageNet
state dict loads as is.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from crnet.config import ModelConfig
from crnet.errors import CheckpointError


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride on the 3x3 conv, as torchvision's Bottleneck (conv2) has it."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _layer(in_channels: int, width: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    # As torchvision's ResNet._make_layer with replace_stride_with_dilation: the first block keeps the
    # previous dilation (1), the others take the new one.
    layers = [Bottleneck(in_channels, width, stride, dilation=1)]
    layers += [Bottleneck(width * 4, width, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetTrunk(nn.Module):
    """conv1 .. layer3 of a ResNet-50 of the given width; returns layer2 and layer3 features."""

    def __init__(self, width: int, blocks: tuple[int, int, int]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = _layer(width, width, blocks[0], stride=1, dilation=1)
        self.layer2 = _layer(width * 4, width * 2, blocks[1], stride=2, dilation=1)
        self.layer3 = _layer(width * 8, width * 4, blocks[2], stride=1, dilation=2)
        self.out_channels = (width * 8, width * 16)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each block: a freshly built trunk starts as near-identity residuals,
        # which is what lets the tiny preset train from scratch without normalisation drift.
        for module in self.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        layer2 = self.layer2(self.layer1(x))
        return layer2, self.layer3(layer2)


def load_torchvision_weights(trunk: ResNetTrunk, path: str | Path) -> None:
    """Load a torchvision `resnet50` state dict file into the trunk (layer4 and fc are dropped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"backbone weights not found: {path}")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would precede our one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt file surfaces as many different unpickling errors
        raise CheckpointError(
            f"cannot read backbone weights {path}: damaged, or not a weights file"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path} does not hold a state dict (parameter names to tensors)")
    state = {k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))}
    expected = trunk.state_dict().keys()
    # BatchNorm's step counter holds no weight, and files saved before torch 0.4.1 have none: BatchNorm fills
    # it in (a plain dict carries no version metadata)
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:  # named by count and a few examples: the full lists run to hundreds of keys
        examples = [", ".join(keys[:3]) or "-" for keys in (missing, unexpected)]
        raise CheckpointError(
            f"{path} is not a torchvision resnet50 state dict: {len(missing)} keys missing (such as "
            f"{examples[0]}), {len(unexpected)} unexpected (such as {examples[1]})"
        )
    broken = next(
        (k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None
    )
    if broken is not None:
        raise CheckpointError(f"{path} holds values that are not finite (NaN or infinity) in {broken}")
    try:
        trunk.load_state_dict(state, strict=True)
    except RuntimeError as error:  # a tensor of another shape: the first mismatch is enough
        mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), "")
        raise CheckpointError(f"{path} is not a ResNet-50 of this width: {mismatch[:200]}") from None


class Neck(nn.Sequential):
    """concat(layer2, layer3) -> 3x3 conv (dilation 2) -> ReLU -> Dropout2d; called with the two levels."""

    def forward(self, layer2: torch.Tensor, layer3: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.cat([layer2, layer3], dim=1))


class Encoder(nn.Module):
    """Shared by support and query: concat(layer2, layer3) -> 3x3 conv (dilation 2) -> ReLU -> Dropout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.trunk = ResNetTrunk(config.width, config.blocks)
        self.neck = Neck(
            nn.Conv2d(sum(self.trunk.out_channels), config.channels, 3, padding=2, dilation=2),
            nn.ReLU(inplace=True),
            nn.Dropout2d(config.dropout),
        )
        self.frozen = not config.train_backbone
        if self.frozen:
            self.trunk.requires_grad_(False)

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        if self.frozen:  # a frozen trunk keeps its ImageNet BatchNorm statistics
            self.trunk.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(*self.trunk(images))
