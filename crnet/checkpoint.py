"""Checkpoint files: written atomically (crnet.files), read with weights_only=True."""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from crnet.config import ConfigError, ModelConfig, TrainConfig
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
    check_configs(state, path)
    return state


def trained_fold(state: dict) -> int | None:
    """The fold whose 15 base classes trained a loaded checkpoint; None where it does not say."""
    return state.get("train_config", {}).get("fold")


def fold_to_test(fold: int | None, state: dict, path: str | Path) -> tuple[int, str | None]:
    """The fold to test a loaded checkpoint on: the one asked for, else the one it was trained on (0 where
    it does not say); and a warning when the fold asked for is another: fold f's novel classes are among the
    training classes of every other fold, so its results would not be few-shot results."""
    trained = trained_fold(state)
    if fold is None:
        return (0 if trained is None else trained), None
    if trained is not None and fold != trained:
        return fold, (
            f"{path} was trained on fold {trained}, whose training classes include fold {fold}'s 5: these "
            "results are not few-shot (unseen-class) results"
        )
    return fold, None


class EditedConfigError(CheckpointError):
    """A crnet checkpoint whose stored settings cannot be used (edited by hand, say)."""


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to us


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flag(value) -> bool:
    return isinstance(value, bool)


def _counts(value: tuple) -> bool:
    return len(value) == 3 and all(_count(n) and n >= 1 for n in value)


# model_config fields as the commands use them; the weights pin down only some of them, and a hand-edited one
# would otherwise load and fail deep inside a command (input_size 0: images resized to nothing).
MODEL_RULES = (
    ("name", lambda v: isinstance(v, str), "a string"),
    # at most 4096: a typo's 100000 made infer build 24 GB of input before the kernel killed it
    ("input_size", lambda v: _count(v) and 1 <= v <= 4096, "an integer from 1 to 4096"),
    ("width", lambda v: _count(v) and v >= 1, "a positive integer"),
    ("channels", lambda v: _count(v) and v >= 1, "a positive integer"),
    ("blocks", _counts, "3 positive integers"),
    ("aspp_dilations", _counts, "3 positive integers"),
    ("iterations", _count, "an integer"),
    ("dropout", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    ("fusion_dropout", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    ("head_dropout", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    ("train_backbone", _flag, "true or false"),
    ("fusion_activation", _flag, "true or false"),
    ("condition_residual", _flag, "true or false"),
)


def _setting_rule(default) -> tuple[Callable[[object], bool], str]:
    """(check, words) for a training setting: a value of its default's type (an int passes for a float;
    a None default marks an optional count)."""
    if default is None:
        return lambda v: v is None or _count(v), "an integer or null"
    if isinstance(default, bool):
        return _flag, "true or false"
    if isinstance(default, str):
        return lambda v: isinstance(v, str), "a string"
    if isinstance(default, int):
        return _count, "an integer"
    return _number, "a number"


def check_configs(state: dict, path: str | Path) -> None:
    """CheckpointError unless the stored model_config and train_config (where present) are settings the
    commands can use: a hand-edited checkpoint is refused here, in one line naming the field, rather than
    failing later with a traceback."""
    for name in ("model_config", "train_config"):
        if name in state and not isinstance(state[name], dict):
            raise EditedConfigError(
                f"{path}: {name} must be a dict of settings, got {type(state[name]).__name__}"
            )
    if "model_config" in state:
        try:
            model = ModelConfig.from_dict(state["model_config"])
        except KeyError as error:
            raise EditedConfigError(f"{path}: model_config has no {error.args[0]}") from None
        except TypeError as error:  # a missing field, an unknown one, a number for a sequence
            raise EditedConfigError(f"{path}: model_config is not usable: {error}") from None
        for field, ok, rule in MODEL_RULES:
            value = getattr(model, field)
            if not ok(value):
                raise EditedConfigError(f"{path}: model_config.{field} must be {rule}, got {value!r}")
        try:
            model.refinement_iterations(model.iterations)  # the limits of the commands' --iterations
        except ConfigError as error:
            raise EditedConfigError(f"{path}: model_config.iterations: {error}") from None
    if "train_config" in state:
        defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
        for field, value in state["train_config"].items():
            if field not in defaults:
                continue  # an unknown field: from_dict below names it
            ok, rule = _setting_rule(defaults[field])
            if not ok(value):
                raise EditedConfigError(f"{path}: train_config.{field} must be {rule}, got {value!r}")
        try:
            TrainConfig.from_dict(state["train_config"])  # its limits (fold in 0..3, ...) and unknown fields
        except (ConfigError, TypeError) as error:
            raise EditedConfigError(f"{path}: train_config is not usable: {error}") from None


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
