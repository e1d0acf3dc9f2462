"""crnet::refine_loop: the whole refinement loop as one native op, and its pure-PyTorch twin.

The compiled library (the extension module `crnet._C`, built from cpp_ext/ by `pip install`) registers
the op with CPU and, where torch has CUDA, CUDA backends. `refine_loop` calls it when it is loaded and
supports the tensors' device and dtype; otherwise it runs `refine_loop_reference`, the same loop in plain
PyTorch ops, and says so once (a NativeFallbackWarning). `use_native` is the one place that decides. The
reference in float64 is the oracle every backend is tested against. The op has no backward: training uses
the module's eager loop.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from crnet.errors import CRNetError, CRNetWarning

NATIVE_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float16)}


def _load() -> str | None:
    """Import the library; the reason it is unusable, or None."""
    try:
        from crnet import _C
    except ImportError as error:
        return f"the native library is not built ({str(error).splitlines()[0]})"
    if _C.torch_version != torch.__version__:
        built, running = _C.torch_version, torch.__version__
        return f"the native library was built for torch {built}, not {running}; reinstall crnet"
    return None


MISSING = _load()
AVAILABLE = MISSING is None
_announced: set[str] = set()

if AVAILABLE:

    @torch.library.register_fake("crnet::refine_loop")
    def _refine_loop_fake(
        features, previous, weights, dilations, iterations, exit_fraction=0.0, cudnn_epilogues=False
    ):
        batch, _, height, width = features.shape
        return features.new_empty(batch, 2, height, width), features.new_empty(batch, dtype=torch.long)


class NativeOpUnavailable(CRNetError):
    """The native refinement op was asked for where it cannot run."""


class NativeFallbackWarning(CRNetWarning):
    """The refinement loop runs as PyTorch ops because the native op cannot (shown once per reason)."""


def announce(reason: str) -> None:
    """One warning per distinct reason the PyTorch loop runs instead of the native op."""
    if reason not in _announced:
        _announced.add(reason)
        warnings.warn(f"refinement runs as a PyTorch loop: {reason}", NativeFallbackWarning, stacklevel=3)


def native_reason(features: torch.Tensor) -> str | None:
    """Why the native op cannot take these features, or None when it can."""
    if not AVAILABLE:
        return MISSING
    device = features.device.type
    if features.dtype not in NATIVE_DTYPES.get(device, ()):
        return f"the native op has no {device} kernel for {features.dtype}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("crnet::refine_loop", device.upper()):
        return f"the native library was built without {device} support"
    return None


def use_native(features: torch.Tensor, wanted: bool | None = None) -> bool:
    """The one decision whether the refinement loop runs as the native op on tensors like `features`.

    wanted False: never. None: wherever the op has a kernel for their device and dtype, the fallback
    announced once. True: it must (NativeOpUnavailable says why it cannot)."""
    if wanted is False:
        return False
    reason = native_reason(features)
    if reason is None:
        return True
    if wanted:
        raise NativeOpUnavailable(f"the native refinement op cannot run: {reason}")
    announce(reason)
    return False


def refine_loop(
    features: torch.Tensor,
    previous: torch.Tensor | None,
    weights: list[torch.Tensor],
    dilations: tuple[int, ...],
    iterations: int,
    exit_fraction: float = 0.0,
    *,
    native: bool | None = None,
    cudnn_epilogues: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) conditioned features -> last logits (N, 2, H, W) and iterations used per sample (N,).

    `weights` in the op's order (`Refinement.op_weights`). With exit_fraction > 0 a sample stops after
    iteration t >= 2 once fewer than that fraction of its mask pixels changed since iteration t - 1.
    `native` as in `use_native`; the PyTorch twin runs otherwise. `cudnn_epilogues`: the op's channels-last
    CUDA path runs its convolutions that end in a ReLU as cuDNN's fused kernels (the same computation).
    """
    if use_native(features, native):
        return torch.ops.crnet.refine_loop(
            features, previous, list(weights), list(dilations), iterations, exit_fraction, cudnn_epilogues
        )
    return refine_loop_reference(features, previous, weights, dilations, iterations, exit_fraction)


def converged(logits: torch.Tensor, previous_logits: torch.Tensor, exit_fraction: float) -> torch.Tensor:
    """(N,) True where fewer than exit_fraction of the mask pixels (logit 1 > logit 0) changed."""
    changed = (logits[:, 1] > logits[:, 0]) != (previous_logits[:, 1] > previous_logits[:, 0])
    return changed.flatten(1).sum(1) < exit_fraction * changed[0].numel()


def widen(tensor: torch.Tensor) -> torch.Tensor:
    """FP32 or wider, for reductions and the softmax (an FP16 sum of 41x41 values loses too much)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def spatial_mean(features: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, 1, 1) mean over the pixels, summed in FP32 or wider, in the features' dtype."""
    return widen(features).mean(dim=(2, 3), keepdim=True).to(features.dtype)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """The softmax over the 2 classes that feeds the next iteration, computed in FP32 or wider."""
    return torch.softmax(widen(logits), dim=1).to(logits.dtype)


def refine_loop_reference(
    features: torch.Tensor,
    previous: torch.Tensor | None,
    weights: list[torch.Tensor],
    dilations: tuple[int, ...],
    iterations: int,
    exit_fraction: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`refine_loop` in plain PyTorch ops, for any device and dtype (softmax and pooling in FP32 or
    wider, as in the model)."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    (fb1, fb1_b, fb2, fb2_b, r2a, r2a_b, r2b, r2b_b, r3a, r3a_b, r3b, r3b_b, pool, pool_b, point, point_b) = (
        weights[:16]
    )
    dilated = [(weights[16 + 2 * i], weights[17 + 2 * i], d) for i, d in enumerate(dilations)]
    project, project_b, classifier, classifier_b = weights[16 + 2 * len(dilations) :]

    def residual(h, w1, b1, w2, b2):
        return F.conv2d(F.relu(F.conv2d(F.relu(h), w1, b1, padding=1)), w2, b2, padding=1)

    def step(x, y):
        h = x + residual(torch.cat([x, y], 1), fb1, fb1_b, fb2, fb2_b)
        h = h + residual(h, r2a, r2a_b, r2b, r2b_b)
        h = h + residual(h, r3a, r3a_b, r3b, r3b_b)
        pooled = spatial_mean(h)
        branches = [F.relu(F.conv2d(pooled, pool, pool_b)).expand_as(h), F.relu(F.conv2d(h, point, point_b))]
        branches += [F.relu(F.conv2d(h, w, b, padding=d, dilation=d)) for w, b, d in dilated]
        aspp = F.relu(F.conv2d(torch.cat(branches, 1), project, project_b))
        return F.conv2d(aspp, classifier, classifier_b)

    batch = features.shape[0]
    logits = features.new_empty(batch, 2, *features.shape[2:])
    used = torch.full((batch,), iterations, dtype=torch.long, device=features.device)
    active = torch.arange(batch, device=features.device)
    x = features
    y = features.new_zeros(logits.shape) if previous is None else previous
    current = None
    for t in range(1, iterations + 1):
        new = step(x, y)
        logits[active] = new
        if t == iterations:
            break
        if exit_fraction > 0 and t >= 2:
            done = converged(new, current, exit_fraction)
            used[active[done]] = t
            keep = ~done
            if not keep.any():
                break
            active, x, new = active[keep], x[keep], new[keep]
        current = new
        y = probabilities(new)
    return logits, used
