"""Exception types. The CLI turns every `CRNetError` into one line on stderr and exit code 2."""

import importlib.util
import os
import sys
import traceback


class CRNetError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""


class DataError(CRNetError):
    """A data root, image or mask cannot be used."""


class NotAVOCTreeError(DataError):
    """The data root does not have the VOC layout."""


class ImageReadError(DataError):
    """An image or mask file is missing or cannot be decoded."""


class MaskError(DataError):
    """A mask has the wrong size or values outside the allowed set."""


class EmptySupportMaskError(MaskError):
    """A support mask marks no foreground pixel, so it defines no prototype."""


class InputError(CRNetError, ValueError):
    """A tensor or object handed to the model or a runtime has the wrong type, shape or dtype."""


class NoSupportError(CRNetError):
    """An episode was given zero support images."""


class CheckpointError(CRNetError):
    """A checkpoint or weight file is missing, corrupt or incompatible."""


class TrainingDiverged(CRNetError):
    """The loss or the weights stopped being finite: the settings (learning rate, weight decay) diverge."""


class CRNetWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI shows it as one `warning:` line)."""


class ZeroPromptWarning(CRNetWarning):
    """A support mask gives a zero prompt: no object pixel, or none on the grid the prototype's pooling
    samples (crnet.model.inputs.check_support_masks)."""


def interrupted(error: BaseException) -> bool:
    """Whether a KeyboardInterrupt (Ctrl-C, or SIGTERM in the CLI) is among the causes of `error`: a library
    that meets one in its own code (the ONNX exporter, a data loader whose workers the same signal
    stopped) may raise its own error from it."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def one_line(error: Exception) -> str:
    """The message itself: errors re-raised from DataLoader workers carry the worker's traceback."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and "DataLoader worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1]  # "crnet.errors.ImageReadError: cannot read ..."
    return " ".join(lines)


def torch_start_failure(error: BaseException) -> str | None:
    """The line for PyTorch failing while it is imported, else None: its logging settings (TORCH_LOGS,
    TORCH_LOGS_OUT) and PYTORCH_JIT are read at import. A failed import leaves no `torch` in sys.modules."""
    if "torch" in sys.modules:
        return None
    spec = importlib.util.find_spec("torch")
    package = os.path.dirname(spec.origin) + os.sep if spec and spec.origin else None
    if package is None or not any(
        f.filename.startswith(package) for f in traceback.extract_tb(error.__traceback__)
    ):
        return None
    if isinstance(error, OSError) and error.filename is not None:
        message = f"{error.strerror or error}: {error.filename}"
    else:  # TORCH_LOGS' message goes on to list every valid setting
        message = " ".join(str(error).split()).split(". ")[0][:300] or type(error).__name__
    settings = sorted(name for name in os.environ if name.startswith(("TORCH_", "PYTORCH_")))
    hint = f" (check {', '.join(settings)})" if settings else ""
    return f"PyTorch cannot start in this environment: {message}{hint}"
