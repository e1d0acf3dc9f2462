"""The refinement head's convolutions as one Triton kernel each: implicit GEMM over channels-last maps, the
ReLU before the convolution and the bias, residual add and ReLU after it inside the same kernel, and the
reduction split over the taps where the map is too small to fill the GPU.

Why: at batch 1 the r50 head's 3x3 convolutions (256 to 256 channels on a 41x41 map) ran on the H200 as
cuDNN kernels of 64x64 tiles: 108 tiles for 132 SMs, one after another along the 2304-long reduction,
about 9 microseconds each, 36 of them per episode (docs/BENCHMARKS.md). Splitting the reduction into S
parts gives S times as many tiles at work at once; the last part to finish a tile adds the parts up (in a
fixed order, so the result does not depend on which part finished last) and applies the epilogue. No
second kernel, no zeroing: a per-tile counter, reset by that last part, says which part is last. And the
residual blocks' ReLU-then-convolution and convolution-plus-skip become two kernels per block, with no
elementwise pass between them.

The split and the tile shape are chosen per convolution shape by timing each candidate once on the GPU, on
the first call (a warm-up, before any CUDA graph capture), as Triton's autotuner would; `+triton-head`
(engines/triton_head.py) puts these kernels in the head, and `crnet bench` decides whether they pay.
Triton runs on CUDA; with TRITON_INTERPRET=1 it runs the same kernel on the CPU, which is how the tests here
check it on a machine without a GPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    part_ptr,
    count_ptr,
    H,
    W,
    C,
    OC,
    HO,
    WO,
    M,
    sxn,
    sxh,
    sxw,
    sxc,
    srn,
    srh,
    srw,
    src,
    son,
    soh,
    sow,
    soc,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU_IN: tl.constexpr,
    RELU_OUT: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """out[m, o] = epilogue(sum over taps t and channels c of prologue(x[pixel m moved by t, c]) * w[t, c, o])
    for output pixels m = (n, oh, ow) and channels o; program (tile, part) sums its part of the steps."""
    tile = tl.program_id(0)
    part = tl.program_id(1)
    tiles_n = tl.cdiv(OC, BN)
    pid_m = tile // tiles_n
    pid_n = tile % tiles_n
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    n = rm // (HO * WO)
    oh = (rm // WO) % HO
    ow = rm % WO
    m_ok = rm < M
    n_ok = rn < OC

    c_steps = tl.cdiv(C, BK)
    steps = KH * KW * c_steps
    per_part = tl.cdiv(steps, SPLIT)
    first = part * per_part
    last = tl.minimum(first + per_part, steps)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for step in range(first, last):
        tap = step // c_steps
        cc = (step % c_steps) * BK + rk
        ih = oh - PAD_H + (tap // KW) * DIL_H
        iw = ow - PAD_W + (tap % KW) * DIL_W
        inside = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # outside: the zero padding
        c_ok = cc < C
        a_ptrs = x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + (cc * sxc)[None, :]
        a = tl.load(a_ptrs, mask=inside[:, None] & c_ok[None, :], other=0.0)
        if RELU_IN:
            a = tl.where(a > 0, a, tl.zeros_like(a))
        b_ptrs = w_ptr + ((tap * C + cc) * OC)[:, None] + rn[None, :]
        b = tl.load(b_ptrs, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)

    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT > 1:
        # Publish this part; the last part of the tile to arrive adds all parts up in order 0..SPLIT-1.
        part_ptrs = part_ptr + (rm * OC)[:, None] + rn[None, :]
        tl.store(part_ptrs + part * M * OC, acc, mask=ok)
        tl.debug_barrier()  # every thread's stores before the release below
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            tl.debug_barrier()
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for p in range(SPLIT):
                acc += tl.load(part_ptrs + p * M * OC, mask=ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next call
            _epilogue(acc, bias_ptr, res_ptr, out_ptr, rn, n, oh, ow, ok, n_ok, srn, srh, srw, src, son, soh,
                      sow, soc, HAS_BIAS, HAS_RES, RELU_OUT)  # fmt: skip
    else:
        _epilogue(acc, bias_ptr, res_ptr, out_ptr, rn, n, oh, ow, ok, n_ok, srn, srh, srw, src, son, soh, sow,
                  soc, HAS_BIAS, HAS_RES, RELU_OUT)  # fmt: skip


@triton.jit
def _epilogue(
    acc,
    bias_ptr,
    res_ptr,
    out_ptr,
    rn,
    n,
    oh,
    ow,
    ok,
    n_ok,
    srn,
    srh,
    srw,
    src,
    son,
    soh,
    sow,
    soc,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU_OUT: tl.constexpr,
):
    """relu?(acc + bias + residual) in FP32, rounded once into the output."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        r_ptrs = res_ptr + (n * srn + oh * srh + ow * srw)[:, None] + (rn * src)[None, :]
        acc += tl.load(r_ptrs, mask=ok, other=0.0).to(tl.float32)
    if RELU_OUT:
        acc = tl.maximum(acc, 0.0)
    o_ptrs = out_ptr + (n * son + oh * soh + ow * sow)[:, None] + (rn * soc)[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class Config:
    """A tile of BM output pixels x BN output channels, BK channels a step, the steps split in `split`."""

    bm: int
    bn: int
    bk: int
    split: int
    warps: int
    stages: int


# The candidates timed for each shape, few since each is compiled for each variant of the epilogue: small
# tiles and split reductions for maps that leave SMs idle (the r50 head's 36 steps, 9 taps x 256 channels
# / 64, split 2, 3 or 4 ways), larger tiles for large batches.
CONFIGS = [
    Config(64, 64, 64, 1, 4, 3),
    Config(64, 64, 64, 2, 4, 3),
    Config(64, 64, 64, 3, 4, 3),
    Config(64, 64, 64, 4, 4, 3),
    Config(32, 64, 64, 2, 4, 3),
    Config(64, 32, 64, 3, 4, 3),
    Config(64, 128, 64, 1, 4, 3),
    Config(128, 64, 64, 1, 4, 3),
    Config(128, 128, 64, 1, 8, 3),
]
SPLIT_ONLY_BELOW = 2  # small: the unsplit 64x64 tiles would be fewer than twice the SMs
SLOTS, SLOT_TILES = 64, 4096  # counters: one block per calling convolution, one counter per tile

_CHOSEN: dict[tuple, Config] = {}
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_LOCK = threading.Lock()


def _tiles(config: Config, pixels: int, out_channels: int) -> int:
    return triton.cdiv(pixels, config.bm) * triton.cdiv(out_channels, config.bn)


def candidates(pixels: int, out_channels: int, device: torch.device) -> list[Config]:
    """The configurations worth timing for this GEMM size on this device."""
    if device.type != "cuda":
        return [CONFIGS[0]]  # the interpreter: nothing to time
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    small = _tiles(CONFIGS[0], pixels, out_channels) < SPLIT_ONLY_BELOW * sms
    return [
        c
        for c in CONFIGS
        if (c.bm * c.bn <= 64 * 64) == small  # small tiles for small maps, large ones for large maps
        and (c.split == 1 or _tiles(c, pixels, out_channels) <= SLOT_TILES)
    ]


def _counters(device: torch.device, slot: int) -> torch.Tensor:
    with _LOCK:
        if device not in _COUNTERS:  # zero once; every call leaves its counters at zero again
            _COUNTERS[device] = torch.zeros(SLOTS * SLOT_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[device][(slot % SLOTS) * SLOT_TILES :]


def conv2d_nhwc(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    kernel: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    relu_in: bool,
    relu_out: bool,
    slot: int = 0,
    config: Config | None = None,
) -> torch.Tensor:
    """relu?(conv2d(relu?(x), weight) + bias + residual), stride 1, channels-last out; `packed` is the
    weight as (KH * KW * C, OC) rows, tap-major (pack_weight). `slot` keeps the split counters of
    convolutions that may run at the same time apart; `config` overrides the timed choice (tests)."""
    batch, channels, height, width = x.shape
    out_channels = packed.shape[1]
    out_h = height + 2 * padding[0] - dilation[0] * (kernel[0] - 1)
    out_w = width + 2 * padding[1] - dilation[1] * (kernel[1] - 1)
    out = torch.empty(
        (batch, out_channels, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
    )
    pixels = batch * out_h * out_w
    if pixels == 0:
        return out
    key = (tuple(x.shape), out_channels, kernel, padding, dilation, x.dtype, x.device, residual is not None)
    counters = _counters(x.device, slot)

    def launch(config: Config, parts: torch.Tensor | None) -> None:
        grid = (_tiles(config, pixels, out_channels), config.split)
        res = residual if residual is not None else out
        _conv_kernel[grid](
            x, packed, bias if bias is not None else packed, res, out,
            parts if parts is not None else out, counters,
            height, width, channels, out_channels, out_h, out_w, pixels,
            *_nhwc_strides(x), *_nhwc_strides(res), *_nhwc_strides(out),
            padding[0], padding[1], dilation[0], dilation[1],
            KH=kernel[0], KW=kernel[1], HAS_BIAS=bias is not None, HAS_RES=residual is not None,
            RELU_IN=relu_in, RELU_OUT=relu_out, IEEE=x.dtype == torch.float32,
            BM=config.bm, BN=config.bn, BK=config.bk, SPLIT=config.split,
            num_warps=config.warps, num_stages=config.stages,
        )  # fmt: skip

    def parts_for(config: Config) -> torch.Tensor | None:
        if config.split == 1:
            return None
        return torch.empty((config.split, pixels, out_channels), dtype=torch.float32, device=x.device)

    config = config or _CHOSEN.get(key)
    if config is None:
        config = _choose(key, candidates(pixels, out_channels, x.device), launch, parts_for, x.device)
    launch(config, parts_for(config))
    return out


def _choose(key, configs, launch, parts_for, device) -> Config:
    """The fastest of `configs` by GPU time (Triton's do_bench), remembered for `key`; during a CUDA graph
    capture, where nothing may be timed, the first one, not remembered."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return configs[0]
    timings = {}
    for config in configs:
        parts = parts_for(config)
        try:
            timings[config] = triton.testing.do_bench(
                lambda c=config, p=parts: launch(c, p), warmup=3, rep=15
            )
        except triton.runtime.errors.OutOfResources:  # too much shared memory for this device: not a choice
            continue
    config = min(timings, key=timings.get)
    _CHOSEN[key] = config
    return config


def _nhwc_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(n, h, w, c) element strides of an (N, C, H, W) tensor, whatever its memory layout."""
    return t.stride(0), t.stride(2), t.stride(3), t.stride(1)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(OC, C, KH, KW) -> (KH * KW * C, OC): the GEMM's right-hand matrix, a tap's channels together."""
    return weight.detach().permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()
