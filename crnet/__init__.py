"""CRNet: Cross-Reference Networks for Few-Shot Segmentation (Liu et al., CVPR 2020).

Public entry points: `build_model`, `CRNet` (encode / prompt / segment), the presets in `crnet.config`.
"""

from crnet.config import ModelConfig, TrainConfig, preset
from crnet.errors import CRNetError
from crnet.model.crnet import CRNet, SupportPrompt, build_model

__all__ = ["CRNet", "CRNetError", "ModelConfig", "SupportPrompt", "TrainConfig", "build_model", "preset"]
__version__ = "0.1.0"
