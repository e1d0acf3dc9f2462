"""The refinement head's convolutions as one Triton kernel each: implicit GEMM over channels-last maps, the
bias, residual add and ReLU after it inside the same kernel (and, where asked, a ReLU'd copy of the output
for the next block to read), and the reduction split over the taps where the map is too small to fill the
GPU.

Why: at batch 1 the r50 head's 3x3 convolutions (256 to 256 channels on a 41x41 map) ran on the H200 as
cuDNN kernels of 64x64 tiles: 108 tiles for 132 SMs, one after another along the 2304-long reduction,
about 9 microseconds each, 36 of them per episode (docs/BENCHMARKS.md). Splitting the reduction into S
parts gives S times as many tiles at work at once; the last part to finish a tile adds the parts up (in a
fixed order, so the result does not depend on which part finished last) and applies the epilogue. No
second kernel, no zeroing: a per-tile counter, reset by that last part, says which part is last. And the
residual blocks become two kernels each, with no elementwise pass between them. A tile skips the rows of
taps that read only zero padding for all its pixels (the outer rows of the ASPP's wide dilations, near the
map's top and bottom), and several convolutions of one map (the ASPP's branches) run as one launch, each
writing its channels of one output.

The split and the tile shape are chosen per convolution shape by timing each candidate once on the GPU, on
the first call (a warm-up, before any CUDA graph capture), as Triton's autotuner would, but replayed from a
CUDA graph, as the deployed path runs. The caller may add
the library's way to compute the same (cuDNN's convolutions, with their fused epilogues) as one more
candidate: a shape on which cuDNN is faster then runs cuDNN, so that a Triton option is never slower than
the library for any one convolution, only for lack of a faster kernel. `+triton-head` and `+triton-encoder`
(engines/triton_head.py) put these kernels in the model, and `crnet bench` decides whether they pay.
Triton runs on CUDA; with TRITON_INTERPRET=1 it runs the same kernel on the CPU, which is how the tests here
check it on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from crnet.engines.triton_head import SUM_TILE, sum_slots


@triton.jit
def split_sum(acc, part_ptrs, part_stride, counter, ok, SPLIT: tl.constexpr):
    """The split reduction's end, for a kernel whose program_id(1) is the part: publish this part's `acc`
    at part_ptrs + part * part_stride; the last part of the tile to arrive (by the tile's `counter`) adds all
    parts up in order 0..SPLIT-1 and resets the counter. Returns (the sum, or this part's acc; whether this
    program finishes the tile)."""
    tl.store(part_ptrs + tl.program_id(1) * part_stride, acc, mask=ok)
    tl.debug_barrier()  # every thread's stores before the release below
    finishes = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT - 1
    if finishes:
        tl.debug_barrier()
        acc = tl.zeros_like(acc)
        for p in range(SPLIT):
            acc += tl.load(part_ptrs + p * part_stride, mask=ok, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next call
    return acc, finishes


@triton.jit
def _conv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    copy_ptr,
    sums_ptr,
    part_ptr,
    count_ptr,
    geometry_ptr,
    H,
    W,
    C,
    OC,
    M,
    P,
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
    TAPS: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU_OUT: tl.constexpr,
    RELU_COPY: tl.constexpr,
    COLUMN_SUMS: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Branch b's out[m, b * OC + o] = epilogue(sum over its taps t and channels c of x[pixel m moved by t, c]
    * w[b, t, c, o]) for output pixels m = (n, oh, ow), and with RELU_COPY relu(out) into `copy` too;
    program (tile, part, branch) sums its part of the branch's steps. Each branch's geometry is six numbers:
    padding (h, w), dilation (h, w), first tap and number of taps (of a KH x KW kernel, row-major).
    No ReLU is applied to x as it is read: an elementwise change of the left operand between loads and
    tensor cores makes ptxas serialize Hopper's wgmma (warning C7515); the caller passes relu(x) instead."""
    tile = tl.program_id(0)
    part = tl.program_id(1)
    branch = tl.program_id(2)
    geometry = geometry_ptr + branch * 6
    pad_h, pad_w = tl.load(geometry), tl.load(geometry + 1)
    dil_h, dil_w = tl.load(geometry + 2), tl.load(geometry + 3)
    first_tap, taps = tl.load(geometry + 4), tl.load(geometry + 5)
    w_ptr += branch * TAPS * C * OC
    tiles_n = tl.cdiv(OC, BN)
    pid_m = tile // tiles_n
    pid_n = tile % tiles_n
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    n = rm // (H * W)  # the output has the map's size
    oh = (rm // W) % H
    ow = rm % W
    m_ok = rm < M
    n_ok = rn < OC

    # The tile's rows of taps that read the map for at least one of its pixels: a wide dilation's outer rows
    # read only padding for tiles near the map's top or bottom, and are skipped (rows of taps are contiguous
    # runs of steps, so this only narrows the loop). A tile across two images keeps every row.
    row_first = (pid_m * BM) // W
    row_last = (tl.minimum(pid_m * BM + BM, M) - 1) // W
    one_image = row_first // H == row_last // H
    oh_min = tl.where(one_image, row_first % H, 0)
    oh_max = tl.where(one_image, row_last % H, H - 1)
    ky_first = tl.where(pad_h > oh_max, (pad_h - oh_max + dil_h - 1) // dil_h, 0)
    ky_last = tl.minimum(TAPS // KW - 1, (H - 1 - oh_min + pad_h) // dil_h)
    tap_first = tl.maximum(first_tap, ky_first * KW)
    tap_end = tl.maximum(tap_first, tl.minimum(first_tap + taps, (ky_last + 1) * KW))

    c_steps = tl.cdiv(C, BK)
    steps = (tap_end - tap_first) * c_steps
    per_part = tl.cdiv(steps, SPLIT)
    first = part * per_part
    last = tl.minimum(first + per_part, steps)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for step in range(first, last):
        tap = tap_first + step // c_steps
        cc = (step % c_steps) * BK + rk
        ih = oh - pad_h + (tap // KW) * dil_h
        iw = ow - pad_w + (tap % KW) * dil_w
        inside = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # outside: the zero padding
        c_ok = cc < C
        a_ptrs = x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + (cc * sxc)[None, :]
        a = tl.load(a_ptrs, mask=inside[:, None] & c_ok[None, :], other=0.0)
        b_ptrs = w_ptr + ((tap * C + cc) * OC)[:, None] + rn[None, :]
        b = tl.load(b_ptrs, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee" if IEEE else None)  # FP32 exact; FP16 as is

    ok = m_ok[:, None] & n_ok[None, :]
    finishes = True
    if SPLIT > 1:
        part_ptrs = part_ptr + branch * SPLIT * M * OC + (rm * OC)[:, None] + rn[None, :]
        counter = count_ptr + branch * tl.num_programs(0) + tile
        acc, finishes = split_sum(acc, part_ptrs, M * OC, counter, ok, SPLIT)
    if finishes:
        # The epilogue: relu?(acc + bias + residual) in FP32, rounded once into the branch's channels of the
        # output (and its ReLU into the copy's, which has the output's strides).
        rc = branch * OC + rn
        if HAS_BIAS:
            acc += tl.load(bias_ptr + branch * OC + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            r_ptrs = res_ptr + (n * srn + oh * srh + ow * srw)[:, None] + (rc * src)[None, :]
            acc += tl.load(r_ptrs, mask=ok, other=0.0).to(tl.float32)
        if RELU_OUT:
            acc = tl.maximum(acc, 0.0)
        offsets = (n * son + oh * soh + ow * sow)[:, None] + (rc * soc)[None, :]
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=ok)
        if RELU_COPY:
            tl.store(copy_ptr + offsets, tl.maximum(acc, 0.0).to(copy_ptr.dtype.element_ty), mask=ok)
        if COLUMN_SUMS:
            # Each image's sums of the output as stored, over this tile's pixels, into the image's slot for
            # this tile (of P); the tile where an image starts zeroes the slots no tile of it fills. A tile
            # spans at most two images (the launcher asks H * W >= BM); the consumer adds the P slots in
            # order, so the sums do not depend on which tile finished first.
            hw = H * W
            stored = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
            total = tl.num_programs(2) * OC
            tile_start = pid_m * BM
            for k in tl.static_range(2):
                img = tile_start // hw + k
                touches = (img * hw < tl.minimum(tile_start + BM, M)) & ((img + 1) * hw > tile_start)
                column = tl.sum(tl.where(((n == img) & m_ok)[:, None], stored, 0.0), axis=0)
                first_tile = (img * hw) // BM
                row = sums_ptr + img * P * total + rc
                tl.store(row + (pid_m - first_tile) * total, column, mask=n_ok & touches)
                if touches & (pid_m == first_tile):
                    filled = ((img + 1) * hw - 1) // BM - first_tile + 1
                    for slot in range(filled, P):
                        tl.store(row + slot * total, tl.zeros((BN,), dtype=tl.float32), mask=n_ok)


@dataclass(frozen=True)
class Config:
    """A tile of BM output pixels x BN output channels, BK channels a step, the steps split in `split`."""

    bm: int
    bn: int
    bk: int
    split: int
    warps: int
    stages: int


# The candidates timed for each shape, few: each is compiled for each variant of the epilogue on the first
# call (at batch 1, about 45 compiles for `+triton-head+triton-encoder`, in gpu_check.sh's warm-up).
# Maps that leave SMs idle (fewer 64x64 tiles, all branches together, than twice the SMs): small tiles and
# the reduction split (the r50 head's 36 steps, 9 taps x 256 channels / 64, split 2 or 4 ways). Larger maps:
# larger tiles, unsplit.
SMALL_MAP_CONFIGS = [
    Config(64, 64, 64, 1, 4, 3),
    Config(64, 64, 64, 2, 4, 3),
    Config(64, 64, 64, 4, 4, 3),
    Config(32, 64, 64, 2, 4, 3),
]
LARGE_MAP_CONFIGS = [
    Config(64, 64, 64, 1, 4, 3),
    Config(64, 128, 64, 1, 8, 3),
    Config(128, 64, 64, 1, 8, 3),
]
# Few input channels (the feedback block's 2 probabilities): 16 a step, the least a tensor-core product takes.
FEW_CHANNELS, FEW_CHANNEL_CONFIGS = 16, [Config(64, 64, 16, 1, 4, 3), Config(128, 64, 16, 1, 4, 3)]
CONFIGS = list(dict.fromkeys(SMALL_MAP_CONFIGS + LARGE_MAP_CONFIGS + FEW_CHANNEL_CONFIGS))
assert all(c.bm >= SUM_TILE for c in CONFIGS)  # no image gets more column-sum slots than sum_slots gives
SMALL_BELOW = 2  # a map is small when its 64x64 tiles are fewer than twice the SMs
SLOTS, SLOT_TILES = 64, 4096  # counters: one block per calling convolution, one counter per tile and branch

_CHOSEN: dict[tuple, Config | str] = {}
# Whether the library's way won, by call site (its slot) and input shape: read by triton_head.runs_library
# when torch.compile traces that call site.
_LIBRARY_AT: dict[tuple[int, tuple[int, ...]], bool] = {}


def chose_library(slot: int, shape: tuple[int, ...]) -> bool:
    """Whether the call site `slot` ran the library's way for inputs of `shape` on an earlier call."""
    return _LIBRARY_AT.get((slot, tuple(shape)), False)


def remember_call_site(slot: int, shape: tuple[int, ...], key: tuple, choice: object) -> None:
    """Note a call site's choice once it is made for good (not a capture's unremembered first candidate)."""
    if choice == LIBRARY or key in _CHOSEN:
        _LIBRARY_AT[(slot, tuple(shape))] = choice == LIBRARY


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_GEOMETRIES: dict[tuple, torch.Tensor] = {}
_LOCK = threading.Lock()


def _tiles(config: Config, pixels: int, out_channels: int) -> int:
    return triton.cdiv(pixels, config.bm) * triton.cdiv(out_channels, config.bn)


def candidates(
    pixels: int, channels: int, out_channels: int, branches: int, device: torch.device
) -> list[Config]:
    """The configurations worth timing for this GEMM size on this device."""
    if device.type != "cuda":
        return [CONFIGS[0]]  # the interpreter: nothing to time
    if channels <= FEW_CHANNELS:
        return FEW_CHANNEL_CONFIGS
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    small = branches * _tiles(CONFIGS[0], pixels, out_channels) < SMALL_BELOW * sms
    configs = SMALL_MAP_CONFIGS if small else LARGE_MAP_CONFIGS
    return [c for c in configs if c.split == 1 or branches * _tiles(c, pixels, out_channels) <= SLOT_TILES]


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The tensors' CUDA device made current: Triton launches a kernel on the current device's current
    stream (JITFunction.run, python/triton/runtime/jit.py), whatever device its tensors are on, and the
    candidates' timing synchronises and captures on the current device too."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _counters(device: torch.device, slot: int) -> torch.Tensor:
    with _LOCK:
        if device not in _COUNTERS:  # zero once; every call leaves its counters at zero again
            _COUNTERS[device] = torch.zeros(SLOTS * SLOT_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[device][(slot % SLOTS) * SLOT_TILES :]


def _geometry(numbers: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The branches' geometry as a tensor on the device, made once (a copy from the host is not allowed
    while a CUDA graph is being captured)."""
    with _LOCK:
        key = (numbers, device)
        if key not in _GEOMETRIES:
            _GEOMETRIES[key] = torch.tensor(numbers, dtype=torch.int32, device=device)
    return _GEOMETRIES[key]


def conv2d_nhwc(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    kernel: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    relu_out: bool,
    relu_copy: bool = False,
    slot: int = 0,
    config: Config | None = None,
    library: Library | None = None,
    column_sums: bool = False,
) -> list[torch.Tensor]:
    """[relu?(conv2d(x, weight) + bias + residual)], stride 1, channels-last, and its ReLU with `relu_copy`
    (the next residual block's input, written by the same epilogue); `packed` is the
    weight as (KH * KW * C, OC) rows, tap-major (triton_head.pack_weight). `slot` keeps the split counters of
    convolutions that may run at the same time apart; `config` overrides the timed choice (tests);
    `library`, the same computed by the library, is timed beside the Triton candidates; `column_sums`, each
    image's sums of the output over its pixels, in slots (branches_nhwc)."""
    if any(2 * pad != d * (k - 1) for pad, d, k in zip(padding, dilation, kernel, strict=True)):
        raise ValueError(f"the Triton convolution keeps the map's size: padding {padding} with {kernel}")
    taps = kernel[0] * kernel[1]
    geometry = (*padding, *dilation, 0, taps)
    bias = None if bias is None else bias[None]
    geometries = [geometry]
    return branches_nhwc(
        x, packed[None], bias, residual, kernel, geometries, relu_out, relu_copy, slot, config, library,
        column_sums,
    )  # fmt: skip


# What a caller may offer as one more candidate: a function computing the same outputs another way.
Library = Callable[[], list[torch.Tensor]]
LIBRARY = "library"  # the choice remembered for a shape on which the library's function was the faster


def branches_nhwc(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    kernel: tuple[int, int],
    geometries: list[tuple[int, ...]],
    relu_out: bool,
    relu_copy: bool = False,
    slot: int = 0,
    config: Config | None = None,
    library: Library | None = None,
    column_sums: bool = False,
) -> list[torch.Tensor]:
    """Several convolutions of one map in one launch, their outputs concatenated along the channels: branch b
    with weight packed[b] (KH * KW * C, OC), bias[b], and geometry (padding h, w, dilation h, w, first tap,
    taps). Every branch must keep the map's size (a 1x1 convolution is the centre tap of a 3x3 one with
    padding and dilation 1). Returns [out], [out, relu(out)] with `relu_copy`, and with `column_sums` also
    each image's sums of `out` over its pixels, (N, sum_slots(H, W), channels) in FP32, to be added over
    the slots (the maps need H * W >= the tile's pixels). `library`, a function that returns the same, is
    timed beside the Triton candidates on the first call for this shape, and called instead of the kernel
    on every call where it was the faster."""
    batch, channels, height, width = x.shape
    count, _, out_channels = packed.shape
    pixels = batch * height * width
    key = (
        tuple(x.shape),
        count,
        out_channels,
        kernel,
        tuple(geometries),
        x.dtype,
        x.device,
        residual is None,
        relu_copy,
        library is not None,
        column_sums,
    )
    counters = _counters(x.device, slot)
    geometry = _geometry(tuple(v for g in geometries for v in g), x.device)

    def run(config: Config) -> list[torch.Tensor]:
        out = torch.empty(
            (batch, count * out_channels, height, width),
            dtype=x.dtype,
            device=x.device,
            memory_format=torch.channels_last,
        )
        copy = torch.empty_like(out) if relu_copy else None
        slots = sum_slots(height, width)  # each a tile's, of at least SUM_TILE pixels
        sums_shape = (batch, slots, count * out_channels)
        sums = torch.empty(sums_shape, dtype=torch.float32, device=x.device) if column_sums else None
        outputs = [t for t in (out, copy, sums) if t is not None]
        if pixels == 0:
            return outputs
        parts = None
        if config.split > 1:
            parts = torch.empty(
                (count, config.split, pixels, out_channels), dtype=torch.float32, device=x.device
            )
        grid = (_tiles(config, pixels, out_channels), config.split, count)
        res = residual if residual is not None else out
        _conv_kernel[grid](
            x, packed, bias if bias is not None else packed, res, out, copy if copy is not None else out,
            sums if sums is not None else out, parts if parts is not None else out, counters, geometry,
            height, width, channels, out_channels, pixels, slots,
            *_nhwc_strides(x), *_nhwc_strides(res), *_nhwc_strides(out),
            TAPS=kernel[0] * kernel[1], KW=kernel[1], HAS_BIAS=bias is not None, HAS_RES=residual is not None,
            RELU_OUT=relu_out, RELU_COPY=relu_copy, COLUMN_SUMS=column_sums, IEEE=x.dtype == torch.float32,
            BM=config.bm, BN=config.bn, BK=config.bk, SPLIT=config.split,
            num_warps=config.warps, num_stages=config.stages,
        )  # fmt: skip
        return outputs

    with on_device(x.device):  # each launch, and the timing of the candidates
        choice = config or _CHOSEN.get(key)
        if pixels == 0:
            return run(CONFIGS[0])  # empty outputs: nothing to launch or to time
        if choice is None:
            configs = candidates(pixels, channels, out_channels, count, x.device)
            if column_sums:  # a tile may span two images, not three; smaller maps take the library's way
                configs = [c for c in configs if c.bm <= height * width]
            if not configs and library is None:
                raise ValueError(f"column sums of {height}x{width} maps need the library's way")
            choice = _choose(key, configs, run, library, x.device) if configs else LIBRARY
        if column_sums and choice != LIBRARY and choice.bm > height * width:
            raise ValueError(f"column sums with {choice.bm}-pixel tiles need maps of as many pixels")
        if config is None:
            remember_call_site(slot, x.shape, key, choice)
        return library() if choice == LIBRARY else run(choice)


# Each candidate is timed as the deployed path runs it: many calls captured in one CUDA graph and replayed,
# warm in L2, no launch paid per kernel. Timed eagerly (Triton's do_bench, until 2026-11-26), the library's
# way paid a launch for each of its kernels where ours is one; on the H200 that day `+triton-head` ran our
# kernel for 29 of its 38 shapes at batch 1 and was 0.19 ms slower an episode than the deployed row.
CHOICE_REP_MS = 5


def _gpu_time(fn: Callable[[], object]) -> float:
    """Mean ms of `fn` replayed from a CUDA graph (its first call, which compiles, runs outside it)."""
    torch.cuda.synchronize()  # the graph's side stream reads what the caller's stream wrote
    return triton.testing.do_bench_cudagraph(fn, rep=CHOICE_REP_MS)


def _choose(key, configs, run, library, device) -> Config | str:
    """The fastest of `configs` and `library` by GPU time under graph replay, remembered for `key`; during a
    CUDA graph capture, where nothing may be timed, the first configuration, not remembered. A candidate
    that this machine's Triton cannot build is no choice (with a warning): the others, and the library's
    way, still are."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return configs[0]
    timings, failed = {}, None
    for config in configs:
        try:
            timings[config] = _gpu_time(lambda c=config: run(c))
        except triton.runtime.errors.OutOfResources:  # too much shared memory for this device: not a choice
            continue
        except Exception as error:  # a compiler error of this Triton version; a CUDA fault recurs below
            failed = failed or error
    if library is not None:
        timings[LIBRARY] = _gpu_time(library)
    if not timings:
        raise failed or RuntimeError(f"no candidate fits this device: {configs}")
    if failed is not None:
        message = f"Triton could not build a candidate for {key[:2]}, timed the others: {failed}"
        warnings.warn(message.splitlines()[0], RuntimeWarning, stacklevel=2)
    choice = min(timings, key=timings.get)
    _CHOSEN[key] = choice
    return choice


def choices() -> list[dict]:
    """What each shape timed so far in this process runs: the kernel (its tile and split) or the library's
    way (for `crnet bench`'s JSON: which shapes a Triton row really ran as ours)."""
    described = []
    for key, choice in _CHOSEN.items():
        parts = [str(part) for part in key if not isinstance(part, torch.device)]
        described.append({"shape": " ".join(parts), "choice": choice if choice == LIBRARY else str(choice)})
    return described


def _nhwc_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(n, h, w, c) element strides of an (N, C, H, W) tensor, whatever its memory layout."""
    return t.stride(0), t.stride(2), t.stride(3), t.stride(1)
