"""The end of each refinement iteration as one Triton kernel: the ASPP's projection (1x1, its concatenated
branches to C channels), the per-sample bias that carries the image-pooling branch and the projection's own
bias, the ReLU, the classifier (1x1, C to 2 channels) with its bias, and the softmax over the two classes
that the next iteration reads.

Why: the hoisted loop ran these as a matrix product, an elementwise pass, a second (2-column) matrix product
and a softmax pass, four kernels per iteration, 20 an episode, each a pass over the map at batch 64 and a
launch at batch 1. Here a tile of pixels holds all C projected channels at once, so the classifier is a
product in the epilogue (its 2 columns padded to 16, the least a tensor-core product takes) and the C-channel
map is never written. On small maps the reduction over the branches' channels is split, as in
triton_conv.py (the last part of a tile to finish adds the parts in a fixed order, and finishes the tile).
The tile and the split are chosen per shape by timing, with the library's four kernels as one more
candidate (triton_conv._choose).

The image-pooling branch's share of the projection, the per-sample bias above, is one more small kernel
(`pooling_term`): from the per-image sums of the last residual block's output, which that block's
convolution wrote in its epilogue (triton_conv.py, column sums), the mean, the pooling branch's 1x1
convolution and ReLU, and its share of the projection. That was a reduction over the map and two matrix
products with a ReLU between them, three or four kernels an iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from crnet.engines.triton_conv import (
    _CHOSEN,
    LIBRARY,
    SLOT_TILES,
    Library,
    _choose,
    _counters,
    on_device,
    remember_call_site,
    split_sum,
)
from crnet.engines.triton_head import CLASS_COLUMNS


@triton.jit
def _project_classify_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    cw_ptr,
    cb_ptr,
    logits_ptr,
    probs_ptr,
    part_ptr,
    count_ptr,
    HW,
    W,
    K,
    C,
    M,
    sxn,
    sxh,
    sxw,
    sxc,
    son,
    soh,
    sow,
    soc,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT: tl.constexpr,
    COLUMNS: tl.constexpr,
):
    """For output pixels m = (n, oh, ow): h[m, c] = relu(sum over k of x[m, k] * w[k, c] + bias[n, c]);
    logits[m, j] = sum over c of h[m, c] * cw[c, j] + cb[j] for the 2 classes j; probabilities = their
    softmax, from the logits as stored. Program (tile, part) sums its part of the k steps for BM pixels and
    all C (<= BN) channels."""
    tile = tl.program_id(0)
    part = tl.program_id(1)
    rm = tile * BM + tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    n = rm // HW
    oh = (rm % HW) // W
    ow = rm % W
    m_ok = rm < M
    n_ok = rn < C
    rows = n * sxn + oh * sxh + ow * sxw

    steps = tl.cdiv(K, BK)
    per_part = tl.cdiv(steps, SPLIT)
    first = part * per_part
    last = tl.minimum(first + per_part, steps)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for step in range(first, last):
        kk = step * BK + rk
        k_ok = kk < K
        a = tl.load(
            x_ptr + rows[:, None] + (kk * sxc)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        b = tl.load(w_ptr + (kk * C)[:, None] + rn[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee" if IEEE else None)

    ok = m_ok[:, None] & n_ok[None, :]
    finishes = True
    if SPLIT > 1:  # as in triton_conv's kernel
        part_ptrs = part_ptr + (rm * C)[:, None] + rn[None, :]
        acc, finishes = split_sum(acc, part_ptrs, M * C, count_ptr + tile, ok, SPLIT)
    if finishes:
        acc += tl.load(bias_ptr + (n * C)[:, None] + rn[None, :], mask=ok, other=0.0).to(tl.float32)
        h = tl.maximum(acc, 0.0).to(cw_ptr.dtype.element_ty)  # rounded as the projection's output would be
        rj = tl.arange(0, COLUMNS)
        cw = tl.load(cw_ptr + (rn * COLUMNS)[:, None] + rj[None, :], mask=n_ok[:, None], other=0.0)
        scores = tl.dot(h, cw, input_precision="ieee" if IEEE else None)  # (BM, COLUMNS), FP32
        background = tl.sum(tl.where(rj[None, :] == 0, scores, 0.0), axis=1)
        foreground = tl.sum(tl.where(rj[None, :] == 1, scores, 0.0), axis=1)
        background = (background + tl.load(cb_ptr).to(tl.float32)).to(logits_ptr.dtype.element_ty)
        foreground = (foreground + tl.load(cb_ptr + 1).to(tl.float32)).to(logits_ptr.dtype.element_ty)
        offsets = n * son + oh * soh + ow * sow
        tl.store(logits_ptr + offsets, background, mask=m_ok)
        tl.store(logits_ptr + offsets + soc, foreground, mask=m_ok)
        # The softmax of the two logits as stored (so in FP32 from FP16 ones, as ops.probabilities does).
        difference = foreground.to(tl.float32) - background.to(tl.float32)
        p_background = 1.0 / (1.0 + tl.exp(difference))
        p_foreground = 1.0 / (1.0 + tl.exp(-difference))
        tl.store(probs_ptr + offsets, p_background.to(probs_ptr.dtype.element_ty), mask=m_ok)
        tl.store(probs_ptr + offsets + soc, p_foreground.to(probs_ptr.dtype.element_ty), mask=m_ok)


@dataclass(frozen=True)
class ProjectConfig:
    """BM pixels a tile (all channels), BK of the branches' channels a step, the steps split in `split`."""

    bm: int
    bk: int
    split: int
    warps: int
    stages: int


# Small maps (the tiles fewer than the SMs): the 16 steps of the r50 head (1024 channels / 64) split 2 or 4
# ways, or 32-pixel tiles; larger maps: unsplit.
SMALL_MAP_CONFIGS = [
    ProjectConfig(64, 64, 1, 8, 3),
    ProjectConfig(64, 64, 2, 8, 3),
    ProjectConfig(64, 64, 4, 8, 3),
    ProjectConfig(32, 64, 4, 4, 3),
]
LARGE_MAP_CONFIGS = [ProjectConfig(64, 64, 1, 8, 3), ProjectConfig(128, 64, 1, 8, 3)]
CONFIGS = list(dict.fromkeys(SMALL_MAP_CONFIGS + LARGE_MAP_CONFIGS))


def project_classify(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    packed_classifier: torch.Tensor,
    classifier_bias: torch.Tensor,
    memory_format: torch.memory_format,
    slot: int = 0,
    config: ProjectConfig | None = None,
    library: Library | None = None,
) -> list[torch.Tensor]:
    """[logits, probabilities], each (N, 2, H, W) in `memory_format`: x (N, K, H, W) the concatenated
    branches, `packed` the projection's weight as (K, C) rows, `bias` (N, C) per sample, `packed_classifier`
    (C, CLASS_COLUMNS) with zeros past the 2 classes. `library` is timed beside the tiles on the first call
    for a shape (triton_conv.branches_nhwc), `config` overrides the choice (tests)."""
    batch, channels, height, width = x.shape
    out_channels = packed.shape[1]
    pixels = batch * height * width
    block_n = triton.next_power_of_2(out_channels)
    key = ("project", tuple(x.shape), out_channels, x.dtype, x.device, memory_format, library is not None)
    counters = _counters(x.device, slot)

    def run(config: ProjectConfig) -> list[torch.Tensor]:
        shape = (batch, 2, height, width)
        logits = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format)
        probs = torch.empty_like(logits)
        if pixels == 0:
            return [logits, probs]
        parts = None
        if config.split > 1:
            parts = torch.empty((config.split, pixels, out_channels), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(pixels, config.bm), config.split)
        _project_classify_kernel[grid](
            x, packed, bias, packed_classifier, classifier_bias, logits, probs,
            parts if parts is not None else logits, counters,
            height * width, width, channels, out_channels, pixels,
            x.stride(0), x.stride(2), x.stride(3), x.stride(1),
            logits.stride(0), logits.stride(2), logits.stride(3), logits.stride(1),
            IEEE=x.dtype == torch.float32, BM=config.bm, BN=block_n, BK=config.bk, SPLIT=config.split,
            COLUMNS=CLASS_COLUMNS, num_warps=config.warps, num_stages=config.stages,
        )  # fmt: skip
        return [logits, probs]

    with on_device(x.device):  # each launch, and the timing of the candidates
        choice = config or _CHOSEN.get(key)
        if pixels == 0:
            return run(CONFIGS[0])
        if choice is None:
            choice = _choose(key, candidates(pixels, x.device), run, library, x.device)
        if config is None:
            remember_call_site(slot, x.shape, key, choice)
        return library() if choice == LIBRARY else run(choice)


def candidates(pixels: int, device: torch.device) -> list[ProjectConfig]:
    """The configurations worth timing for this many pixels on this device."""
    if device.type != "cuda":
        return [CONFIGS[0]]  # the interpreter: nothing to time
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if triton.cdiv(pixels, 64) >= sms:
        return LARGE_MAP_CONFIGS
    return [c for c in SMALL_MAP_CONFIGS if triton.cdiv(pixels, c.bm) <= SLOT_TILES]


@triton.jit
def _pooling_step_kernel(
    src_ptr,
    w_ptr,
    b_ptr,
    dst_ptr,
    P,
    C,
    scale,
    FROM_SUMS: tl.constexpr,
    BN: tl.constexpr,
    CB: tl.constexpr,
):
    """One of the pooling term's two products, for image n (program axis 0) and output channels
    [j CB, (j + 1) CB) (axis 1): with FROM_SUMS, pooled = relu(mean @ wp + bp), the mean from the P slots
    of sums[n] times `scale`; else out = pooled @ ws + bs. The weights as (C in, C out) rows. A program an
    output block, not an image: with an image's two products as one program's 2 C / CB steps in a row, the
    term took 27 us a call at batch 1 on the H200, 0.137 ms an episode, where the deployed row's whole
    pooling and reduction group took 0.024 ms (docs/BENCHMARKS.md)."""
    n = tl.program_id(0)
    cols = tl.program_id(1) * CB + tl.arange(0, CB)
    rc = tl.arange(0, BN)
    c_ok, cols_ok = rc < C, cols < C
    if FROM_SUMS:
        vector = tl.zeros((BN,), dtype=tl.float32)
        for slot in range(P):  # in order: the sums do not depend on which tile wrote first
            vector += tl.load(src_ptr + (n * P + slot) * C + rc, mask=c_ok, other=0.0)
        vector = vector * scale
    else:
        vector = tl.load(src_ptr + n * C + rc, mask=c_ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + rc[:, None] * C + cols[None, :], mask=c_ok[:, None] & cols_ok[None, :], other=0.0)
    value = tl.sum(w.to(tl.float32) * vector[:, None], axis=0)
    value += tl.load(b_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32)
    if FROM_SUMS:
        value = tl.maximum(value, 0.0)
    # pooled rounded to the weights' dtype, as the pooling branch's output would be
    tl.store(dst_ptr + n * C + cols, value.to(dst_ptr.dtype.element_ty), mask=cols_ok)


@dataclass(frozen=True)
class PoolingConfig:
    """Output channels a step of the two products, and warps."""

    cb: int
    warps: int


POOLING_CONFIGS = [PoolingConfig(16, 4), PoolingConfig(32, 4), PoolingConfig(32, 8)]


def pooling_term(
    sums: torch.Tensor,
    pixels: int,
    packed_pool: torch.Tensor,
    pool_bias: torch.Tensor,
    packed_share: torch.Tensor,
    share_bias: torch.Tensor,
    config: PoolingConfig | None = None,
    library: Library | None = None,
) -> torch.Tensor:
    """The image-pooling branch's share of the projection, (N, C, 1, 1) in the weights' dtype: `sums`
    (N, P, C) FP32 per-image sums in slots (triton_conv.branches_nhwc's column sums) of a map of `pixels`
    pixels, the pooling convolution's weight and the projection's share of it as (C in, C out) rows.
    `library` is timed beside the kernel on the first call for a shape, as in branches_nhwc."""
    batch, slots, channels = sums.shape
    block_n = triton.next_power_of_2(channels)
    key = ("pooling", tuple(sums.shape), pixels, packed_pool.dtype, sums.device, library is not None)

    def run(config: PoolingConfig) -> torch.Tensor:
        out = torch.empty((batch, channels, 1, 1), dtype=packed_pool.dtype, device=sums.device)
        pooled = torch.empty((batch, channels), dtype=packed_pool.dtype, device=sums.device)
        if batch:
            step = min(config.cb, block_n)
            grid = (batch, triton.cdiv(channels, step))
            for src, weight, bias, dst, from_sums in (
                (sums, packed_pool, pool_bias, pooled, True),
                (pooled, packed_share, share_bias, out, False),
            ):
                _pooling_step_kernel[grid](
                    src, weight, bias, dst, slots, channels, 1.0 / pixels,
                    FROM_SUMS=from_sums, BN=block_n, CB=step, num_warps=config.warps,
                )  # fmt: skip
        return out

    with on_device(sums.device):  # each launch, and the timing of the candidates
        choice = config or _CHOSEN.get(key)
        if choice is None:
            choice = _choose(key, POOLING_CONFIGS, run, library, sums.device)  # off CUDA: the first
        return library() if choice == LIBRARY else run(choice)
