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
    if device.type == "cpu" and device.index:  # torch takes cpu:7 as the CPU; it pins nothing to core 7
        raise CRNetError(f"--device {name}: the CPU is one device here; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CRNetError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), from cuda:0"
        )
    return device


def flush_denormals_for_inference(device: torch.device) -> None:
    """On a CPU, treat denormal floats as zero for the rest of this process (inference commands only).

    Activations that decay into the denormal range make x86 float arithmetic take a slow path: on a CPU
    without AVX-512 the torch runtime ran 25 to 50 times slower (docs/BENCHMARKS.md). Values under 1.2e-38
    carry nothing a segmentation needs. Training is left alone, so its runs stay bit-identical to earlier
    ones. GPUs flush denormals in their own kernels' modes; nothing to do there."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)
