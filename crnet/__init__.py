"""CRNet: Cross-Reference Networks for Few-Shot Segmentation (Liu et al., CVPR 2020).

Public entry points: `build_model`, `CRNet` (encode / prompt / segment), the presets in `crnet.config`.
They load on first use, so that `import crnet` costs nothing: the `crnet` command handles Ctrl-C and
SIGTERM from its first line, and torch takes seconds to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crnet.config import ModelConfig, TrainConfig, preset
    from crnet.errors import CRNetError
    from crnet.model.crnet import CRNet, SupportPrompt, build_model

__all__ = ["CRNet", "CRNetError", "ModelConfig", "SupportPrompt", "TrainConfig", "build_model", "preset"]
__version__ = "0.1.0"

_HOMES = {
    "CRNet": "crnet.model.crnet",
    "SupportPrompt": "crnet.model.crnet",
    "build_model": "crnet.model.crnet",
    "ModelConfig": "crnet.config",
    "TrainConfig": "crnet.config",
    "preset": "crnet.config",
    "CRNetError": "crnet.errors",
}


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'crnet' has no attribute {name!r}")  # lets `from crnet import x` find x.py
