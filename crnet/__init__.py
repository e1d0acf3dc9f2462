"""CRNet: Cross-Reference Networks for Few-Shot Segmentation (Liu et al., CVPR 2020).

Public entry points: `build_model`, `CRNet` (encode / prompt / segment), the presets in `crnet.config`.
The model's names load on first use, so that `import crnet` is cheap: the `crnet` command installs its
Ctrl-C and SIGTERM handling before torch (seconds to import) is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from crnet.config import ModelConfig, TrainConfig, preset
from crnet.errors import CRNetError

if TYPE_CHECKING:
    from crnet.model.crnet import CRNet, SupportPrompt, build_model

__all__ = ["CRNet", "CRNetError", "ModelConfig", "SupportPrompt", "TrainConfig", "build_model", "preset"]
__version__ = "0.1.0"

_MODEL_NAMES = ("CRNet", "SupportPrompt", "build_model")


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        value = getattr(importlib.import_module("crnet.model.crnet"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'crnet' has no attribute {name!r}")  # lets `from crnet import x` find x.py
