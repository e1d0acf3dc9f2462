"""Optional heavy libraries, imported where they are needed: a missing one is a one-line user error."""

from __future__ import annotations

import importlib
from types import ModuleType

from crnet.errors import CRNetError

INSTALL = {
    "onnx": "pip install 'crnet[export]'",
    "onnxscript": "pip install 'crnet[export]'",
    "onnxruntime": "pip install 'crnet[export]' (or onnxruntime-gpu for CUDA)",
    "tensorrt": "pip install tensorrt (needs an NVIDIA GPU and driver)",
    "matplotlib": "pip install 'crnet[bench]'",
}


class MissingDependencyError(CRNetError):
    """An optional library that this command needs is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` or raise MissingDependencyError naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        how = INSTALL.get(module.split(".")[0], f"pip install {module}")
        raise MissingDependencyError(
            f"{purpose} needs {module}, which is not installed ({error.msg}): {how}"
        ) from None


_TENSORRT_LOGGERS: dict = {}


def tensorrt_logger(trt):
    """One trt.Logger (warnings and errors) for every TensorRT builder and runtime of the process: TensorRT
    keeps the first it is given and warns when another comes."""
    if trt not in _TENSORRT_LOGGERS:
        _TENSORRT_LOGGERS[trt] = trt.Logger(trt.Logger.WARNING)
    return _TENSORRT_LOGGERS[trt]
