"""Device selection with a clear error when CUDA is asked for but absent."""

from __future__ import annotations

import torch

from crnet.errors import CRNetError


def resolve_device(name: str | None) -> torch.device:
    """'auto'/None picks CUDA when present; 'cuda' without a GPU is a user error, not a traceback."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CRNetError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CRNetError(f"--device {name} asked for CUDA, but this machine has no usable CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise CRNetError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device
