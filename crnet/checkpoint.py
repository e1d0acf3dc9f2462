"""Checkpoint files: written atomically (crnet.files), read with weights_only=True."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

from crnet.config import ModelConfig
from crnet.errors import CheckpointError
from crnet.files import write_bytes
from crnet.model.crnet import CRNet, build_model

FORMAT = "crnet-checkpoint-1"


def save_atomic(state: dict, path: str | Path) -> Path:
    """Write a checkpoint atomically (crnet.files): never a half-written file, no temporary left on any
    failure, a full disk reported in one line (DiskFullError) with the previous file intact."""
    buffer = io.BytesIO()  # serialised first, so that a failed write is a plain OSError, not torch's
    torch.save({"format": FORMAT, **state}, buffer)
    return write_bytes(path, buffer.getbuffer())


def load(path: str | Path) -> dict:
    """A checkpoint dict; CheckpointError when the file is missing, corrupt or not ours."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} is a directory; give the .pt file in it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would precede our one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # corrupt zips and foreign pickles raise many different types
        raise CheckpointError(
            f"cannot read checkpoint {path}: damaged, or not a PyTorch weights file"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a crnet checkpoint")
    return state


def load_model(path: str | Path, device: str | torch.device = "cpu") -> CRNet:
    """The model stored in a checkpoint, in eval mode."""
    return model_from_state(load(path), path, device)


def model_from_state(state: dict, path: str | Path, device: str | torch.device = "cpu") -> CRNet:
    """The model of an already loaded checkpoint dict (`path` only names it in errors)."""
    try:
        model = build_model(ModelConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not match its model config: {reason}") from None
    return model.to(device).eval()
